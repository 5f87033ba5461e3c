"""`LoraProAdamW` built from parameters / param groups (what transformers' `optimizer_cls_and_kwargs` passes) steps
exactly like `LoraProAdamW(model)`: A and B are still paired by the layers that own them, whatever the order."""

from __future__ import annotations

import copy

import pytest
import torch

from peft.optimizers import LoraProAdamW
from tests.optimizers.test_lorapro import _backward, _model


def _named(model, fragment: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if fragment in n and p.requires_grad]


def _steps(model, optimizer, n: int = 3) -> None:
    for step in range(n):
        _backward(model, seed=step + 1)
        optimizer.step()


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_param_groups_step_like_the_model(mode):
    """The Trainer's two groups (factors with weight decay, the head's bias without), in reversed order inside each
    group so that pairing by position would fail: the same steps as LoraProAdamW(model) with those decays."""
    model = _model(mode=mode, init_lora_weights=False)
    twin = copy.deepcopy(model)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    grouped = LoraProAdamW([{"params": decay[::-1], "weight_decay": 0.1}, {"params": no_decay[::-1],
                                                                          "weight_decay": 0.0}], lr=1e-2)
    assert len(grouped.pairs) == 2 and [g["weight_decay"] for g in grouped.param_groups] == [0.1, 0.0]
    reference = LoraProAdamW(twin, lr=1e-2, weight_decay=0.1)
    reference.param_groups[1]["params"] = [p for p in reference.param_groups[1]["params"] if p.ndim > 1]
    reference.add_param_group({"params": [p for n, p in twin.named_parameters() if p.requires_grad
                                          and n.endswith("bias")], "weight_decay": 0.0})
    _steps(model, grouped)
    _steps(twin, reference)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)


def test_a_list_of_parameters_and_its_state_dict_round_trip():
    model = _model(init_lora_weights=False)
    optimizer = LoraProAdamW((p for p in model.parameters() if p.requires_grad), lr=1e-2)
    _steps(model, optimizer, 2)
    twin = copy.deepcopy(model)
    resumed = LoraProAdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _steps(model, optimizer, 1)
    _steps(twin, resumed, 1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_bad_groups_are_clear_errors():
    model = _model()
    A, B = _named(model, "fc1.lora_A"), _named(model, "fc1.lora_B")
    with pytest.raises(ValueError, match="partner B is in another param group"):
        LoraProAdamW([{"params": A}, {"params": B + _named(model, "fc2.lora")}])
    with pytest.raises(ValueError, match="partner B is not among the parameters"):
        LoraProAdamW(A + _named(model, "fc2.lora"))
    with pytest.raises(ValueError, match="no LoRA factor among its parameters"):
        LoraProAdamW(_named(model, "head"))
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        LoraProAdamW([{"params": A + B, "weight_decay": -1.0}])
