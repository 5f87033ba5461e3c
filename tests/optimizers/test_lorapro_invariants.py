"""`LoraProAdamW` / `register_lorapro_adjustment` invariants on tiny float64 models: k accumulated micro-batches
step exactly like one big batch (the adjustment runs once per optimizer step), no (m, m) tensor in a step, lazily
created state whose `state_dict()` round trip is exact, and the errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from peft import LoraProConfig, get_peft_model
from peft.optimizers import AdamWLoRAPro, LoraProAdamW, register_lorapro_adjustment
from tests.optimizers.test_lorapro import _backward, _layer, _model

STEPS = 3


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen, dtype=torch.float64)


def _optimizer(model: nn.Module, variant: str):
    if variant == "sgd+hook":
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        register_lorapro_adjustment(sgd, model)
        return sgd
    return LoraProAdamW(model, lr=1e-2, weight_decay=0.01, mode=variant)


def _train(model: nn.Module, opt, micro: int, adjust_each_micro_batch: bool = False) -> None:
    """STEPS optimizer steps, each over the same 8 samples split in `micro` micro-batches (loss / micro).

    `adjust_each_micro_batch` replays the trap the issue warns about (adjusting the already accumulated gradient
    after every micro-batch) to show the comparison can fail."""
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (((model(xs) - ys) ** 2).mean() / micro).backward()
            if adjust_each_micro_batch:
                with torch.no_grad():
                    for layer in (_layer(model, "fc1"), _layer(model, "fc2")):
                        A, B = layer.lorapro_factors("default")
                        gA, gB = layer.lorapro_adjusted_gradients("default", A.grad, B.grad)
                        A.grad.copy_(gA)
                        B.grad.copy_(gB)
        opt.step()


@pytest.mark.parametrize("variant", ["full", "efficient", "sgd+hook"])
def test_k_micro_batches_step_like_one_big_batch(variant):
    big, small = _model(), _model()
    _train(big, _optimizer(big, variant), micro=1)
    _train(small, _optimizer(small, variant), micro=4)
    for (name, p), (_, q) in zip(big.named_parameters(), small.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-12, rtol=1e-10, msg=f"{variant}: {name}")
    moved = [n for n, p in big.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert len(moved) == 2


def test_adjusting_per_micro_batch_would_be_caught():
    """The negative control: the trap (adjust after every micro-batch) changes the result."""
    reference, trap = _model(), _model()
    _train(reference, torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.05), 1, True)
    _train(trap, torch.optim.SGD([p for p in trap.parameters() if p.requires_grad], lr=0.05), 4, True)
    diff = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), trap.parameters()))
    assert diff > 1e-6


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


@pytest.mark.parametrize("mode, bound", [("full", 256 * 8), ("efficient", 256 * 2)])
def test_a_step_forms_no_m_by_m_tensor(mode, bound):
    """m = 256 >> n = 8 >> r = 2: full mode's largest tensor is (m, n), efficient mode's (m, r); never (m, m)."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 256)).double(),
                           LoraProConfig(r=2, target_modules=["0"], mode=mode, init_lora_weights=False))
    opt = LoraProAdamW(model, lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8, dtype=torch.float64)).pow(2).mean().backward()
        with _LargestTensor() as largest:
            opt.step()
        assert 0 < largest.numel <= bound < 256 * 256


def test_state_is_created_lazily_and_round_trips_exactly():
    model = _model(dtype=torch.float32)
    opt = LoraProAdamW(model, lr=1e-2)
    assert not opt.state, "no state before the first step"
    _backward(model, 1, torch.float32)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    for p in head:
        p.grad = None  # a parameter without a gradient gets no state
    opt.step()
    assert set(map(id, opt.state)) == {id(p) for pair in opt.pairs for p in (pair.A,)}  # full mode: on A only
    saved = copy.deepcopy(opt.state_dict())
    opt2 = LoraProAdamW(model, lr=1.0)
    opt2.load_state_dict(saved)
    again = opt2.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            other = again["state"][index][key]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value, key
            assert not torch.is_tensor(value) or other.dtype == torch.float32


def test_added_param_group_is_plain_adamw():
    model = _model(modules_to_save=None)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LoraProAdamW(model, lr=1e-2)
    opt.add_param_group({"params": [extra], "lr": 0.1})
    twin = torch.optim.AdamW([nn.Parameter(extra.detach().clone())], lr=0.1, weight_decay=0.0)
    for opt_, p in ((opt, extra), (twin, twin.param_groups[0]["params"][0])):
        p.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        opt_.step()
    torch.testing.assert_close(extra, twin.param_groups[0]["params"][0])


def test_bad_input_errors_more():
    model = _model()
    _layer(model, "fc1").lora_A["default"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'default' of base_model.model.fc1: A is frozen"):
        LoraProAdamW(model)
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    with pytest.raises(ValueError, match="A is frozen"):
        AdamWLoRAPro(lora)
    frozen = _model(modules_to_save=None)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="none of their A/B factors is trainable"):
        LoraProAdamW(frozen)
    with pytest.raises(ValueError, match="got no trainable parameters"):
        AdamWLoRAPro(frozen.parameters())
    # another model in the process with a half-frozen pair does not concern this one
    other = _model(modules_to_save=None)
    assert len(AdamWLoRAPro([p for p in other.parameters() if p.requires_grad]).pairs) == 2
    with pytest.raises(ValueError, match="r <= min.*r=5, update shape \\(4, 5\\)"):
        get_peft_model(nn.Sequential(nn.Linear(5, 4)), LoraProConfig(r=4, rank_pattern={"0": 5}, target_modules=["0"]))


def test_state_of_the_other_mode_is_a_clear_error():
    full = _model(r=1)
    opt = LoraProAdamW(full)
    _backward(full)
    opt.step()
    efficient = _model(r=1, mode="efficient")
    opt2 = LoraProAdamW(efficient)
    opt2.load_state_dict(opt.state_dict())
    _backward(efficient)
    with pytest.raises(ValueError, match=r"exp_avg has shape \(5, 6\), expected \(1, 6\) for mode 'efficient'"):
        opt2.step()

