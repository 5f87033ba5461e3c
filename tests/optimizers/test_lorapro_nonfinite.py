"""A NaN or inf gradient (issue 12, item 11): the step is refused with a FloatingPointError that names the parameter
(before: NaN went into A and B, and every later step failed in `linalg.eigh` without mentioning NaN), parameters
and state untouched; or, with `nonfinite="skip"`, skipped and counted in the state dict, as a GradScaler does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft.optimizers import AdamWLoRAPro, LoraProAdamW, register_lorapro_adjustment
from peft.optimizers.nonfinite import all_finite
from tests.optimizers.test_lorapro import _backward, _layer, _model, _tower

F32 = torch.float32


def _snapshot(model, opt):
    return copy.deepcopy({n: p.detach() for n, p in model.named_parameters()}), copy.deepcopy(opt.state_dict())


def _assert_untouched(model, opt, snapshot):
    params, state = snapshot
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), name
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for key, entry in state["state"].items():
        for field, value in entry.items():
            assert torch.equal(torch.as_tensor(now["state"][key][field]), torch.as_tensor(value)), (key, field)


@pytest.mark.parametrize("mode", ["full", "efficient"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_naming_the_layer_and_changes_nothing(mode, bad):
    model = _model(mode=mode, dtype=F32)
    opt = LoraProAdamW(model, lr=1e-2)
    _backward(model, 1, F32)
    opt.step()  # B has left zero: state exists and would be poisoned
    snapshot = _snapshot(model, opt)
    _backward(model, 2, F32)
    _layer(model, "fc2").lora_B["default"].weight.grad[0, 0] = bad  # e.g. an fp16 overflow without a GradScaler
    with pytest.raises(FloatingPointError, match=r"B of layer 'base_model\.model\.fc2' \(adapter 'default'\)"):
        opt.step()
    _assert_untouched(model, opt, snapshot)
    _backward(model, 2, F32)  # the next finite step goes on as if nothing happened
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[_layer(model, "fc1").lora_A["default"].weight]["step"] == 2


def test_optimizer_built_from_parameters_names_the_layer_too():
    """The Trainer's way (param groups, no model): the layer's name is looked up when the error is made."""
    model = _model(dtype=F32)
    opt = LoraProAdamW([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-2)
    _backward(model, 1, F32)
    _layer(model, "fc1").lora_B["default"].weight.grad[-1, -1] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"B of layer 'fc1' \(adapter 'default'\)"):
        opt.step()


def test_nonfinite_gradient_of_another_parameter_is_caught_too():
    model = _model(dtype=F32)
    opt = LoraProAdamW(model, lr=1e-2)
    _backward(model, 1, F32)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n][0]
    head.grad.view(-1)[0] = float("nan")
    snapshot = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"parameter #\d+ of param group #1"):
        opt.step()
    _assert_untouched(model, opt, snapshot)


def test_skip_counts_the_steps_and_the_count_round_trips():
    model = _model(mode="full", dtype=F32)
    opt = AdamWLoRAPro([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-2, nonfinite="skip")
    _backward(model, 1, F32)
    opt.step()
    snapshot = _snapshot(model, opt)
    for _ in range(2):
        _backward(model, 2, F32)
        _layer(model, "fc1").lora_A["default"].weight.grad.fill_(float("inf"))
        opt.step()
    _assert_untouched(model, opt, snapshot)
    saved = opt.state_dict()
    assert opt.skipped_steps == 2 and saved["skipped_steps"] == 2
    fresh = AdamWLoRAPro([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-2, nonfinite="skip")
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 2
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        LoraProAdamW(model, nonfinite="ignore")


def test_registered_adjustment_raises_before_the_wrapped_step():
    model = _model(dtype=F32)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    register_lorapro_adjustment(sgd, model)
    _backward(model, 1, F32)
    _layer(model, "fc1").lora_A["default"].weight.grad[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="A of layer 'base_model.model.fc1'"):
        sgd.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_finite_gradients_whose_norm_overflows_are_finite():
    """The check reduces with a 2-norm; one that overflows on finite entries is told apart entry by entry."""
    huge = torch.full((4, 4), 3e38)
    assert all_finite([huge, torch.ones(3)]) and not torch.isfinite(torch.linalg.vector_norm(huge))
    assert not all_finite([huge, torch.tensor([1.0, float("nan")])])
    assert all_finite([torch.full((3,), 6e4, dtype=torch.float16)])  # the fp16 norm overflows, the entries do not


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_check_is_one_fused_reduction_whatever_the_number_of_gradients():
    counts = []
    for layers in (1, 8):
        model = _tower(layers, "efficient", F32)
        model(torch.randn(8, 6)).square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        with _Ops() as ops:
            assert all_finite(grads)
        counts.append(ops.names)
    assert counts[0] == counts[1]  # the same few ops for 4 and 18 gradients: no per-gradient (or per-entry) work
    assert counts[0].count("_foreach_norm.Scalar") == 1 and len(counts[0]) <= 10, counts[0]
