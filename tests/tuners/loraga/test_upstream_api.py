"""Upstream PEFT 0.21.2's LoRA-GA spelling at upstream's import paths: `peft.tuners.lora.LoraGAConfig` is the
sub-config of `LoraConfig(lora_ga_config=...)` (while `peft.LoraGAConfig` stays this package's tuner config), and
`preprocess_loraga` shows each target's gradient as `module._peft_loraga_grad` until the init uses it, gives
targets no backward pass reached LoRA's default init, and refuses quantized targets and runs that reach no target."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import peft
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraGAConfig, preprocess_loraga
from peft.tuners.loraga.context import _PENDING, _UNREACHED
from peft.tuners.loraga.upstream import LoraGASubConfig
from tests.upstream_harness import UpstreamUnavailable, run_upstream


class Net(nn.Module):
    """`used` is in the forward, `idle` is not (no backward pass reaches it)."""

    def __init__(self, quant_marker: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used, self.idle = nn.Linear(6, 5), nn.Linear(6, 5)
        if quant_marker:  # how a quantized layer shows itself (bitsandbytes keeps a quant_state)
            self.used.quant_state = "nf4"

    def forward(self, x):
        return self.used(x)


X = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))


def _step(model):
    def train_step():
        for x in X:
            model(x).pow(2).sum().backward()
    return train_step


def _config(targets=("used",), **sub) -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig(**sub))


def _no_state(model) -> bool:
    return model not in _PENDING and model not in _UNREACHED and not any(
        hasattr(m, "_peft_loraga_grad") for m in model.modules())


def test_names_resolve_to_two_classes():
    assert LoraGAConfig is LoraGASubConfig and peft.tuners.lora.preprocess_loraga is peft.preprocess_loraga
    assert peft.LoraGAConfig is not LoraGAConfig and peft.LoraGAConfig(r=2).peft_type == peft.PeftType.LORAGA
    assert {"LoraGAConfig", "preprocess_loraga"} <= set(peft.tuners.lora.__all__)


@pytest.mark.parametrize("given", [{"direction": "A2rBr", "scale": "weight_svd"},
                                   LoraGAConfig(direction="A2rBr", scale="weight_svd"),
                                   peft.LoraGAConfig(direction="A2rBr", scale="weight_svd")])
def test_lora_ga_config_stored_as_sub_config_and_round_trips(tmp_path, given):
    config = LoraConfig(init_lora_weights="lora_ga", target_modules=["used"], lora_ga_config=given)
    sub = config.lora_ga_config
    assert isinstance(sub, LoraGAConfig) and sub.direction == "A2rBr" and sub.scale in ("weight_svd", "weightS")
    config.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["lora_ga_config"]
    assert saved == {"direction": "A2rBr", "scale": sub.scale, "stable_gamma": 16, "dtype": "fp32"}
    assert PeftConfig.from_pretrained(str(tmp_path)).lora_ga_config == sub


@pytest.mark.parametrize(("kwargs", "match"), [({"direction": "BrA2r"}, "Invalid direction='BrA2r'"),
                                               ({"scale": "big"}, "Invalid scale='big'"),
                                               ({"stable_gamma": -1}, "Invalid stable_gamma=-1")])
def test_sub_config_checks_values_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraGAConfig(**kwargs)
    with pytest.raises(ValueError, match="lora_ga_config"):
        LoraConfig(init_lora_weights="lora_ga", lora_ga_config=kwargs)


def test_gradient_attribute_is_the_mean_gradient_and_goes_with_the_init():
    model = Net()
    preprocess_loraga(model, _config(), _step(model))
    grad = model.used._peft_loraga_grad
    expected = torch.zeros(5, 6, dtype=torch.float64)  # d/dW sum((W x + b)^2) = 2 (W x + b) x^T, per batch
    W, b = model.used.weight.double(), model.used.bias.double()
    for x in X:
        x = x.double()
        expected += 2 * (x @ W.T + b).T @ x
    torch.testing.assert_close(grad.double(), expected / len(X), rtol=1e-5, atol=1e-5)
    assert grad.dtype == torch.float32 and all(p.grad is None for p in model.parameters())
    ref = model(X[0]).detach()
    peft_model = get_peft_model(model, _config())
    assert _no_state(model)
    torch.testing.assert_close(peft_model(X[0]), ref, rtol=1e-5, atol=1e-6)  # the init keeps the output
    assert peft_model.base_model.model.used.lora_B["default"].weight.abs().sum() > 0


def test_unreached_target_keeps_default_init_with_warning():
    model = Net()
    idle_weight = model.idle.weight.detach().clone()
    preprocess_loraga(model, _config(("used", "idle")), _step(model))
    assert hasattr(model.used, "_peft_loraga_grad") and not hasattr(model.idle, "_peft_loraga_grad")
    with pytest.warns(UserWarning, match="reached 'idle'"):
        peft_model = get_peft_model(model, _config(("used", "idle")))
    idle = peft_model.base_model.model.idle
    assert torch.count_nonzero(idle.lora_B["default"].weight) == 0
    assert torch.equal(idle.get_base_layer().weight, idle_weight)  # not offset
    assert peft_model.base_model.model.used.lora_B["default"].weight.abs().sum() > 0 and _no_state(model)


def test_a_module_missing_from_the_gradients_is_still_an_error():
    """Only preprocess_loraga's own unreached targets fall back; a target it never saw is a mismatch."""
    model = Net()
    preprocess_loraga(model, _config(), _step(model))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="No estimated gradient for target module 'idle'"):
        get_peft_model(model, _config(("used", "idle")))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize(("make", "targets", "step", "match"), [
    (lambda: Net(), ("idle",), lambda model: model.zero_grad, "No supported layers found with a gradient"),
    (lambda: nn.Sequential(nn.ReLU()), ("0",), _step, "No supported layers found: "),
    (lambda: Net(quant_marker=True), ("used", "idle"), _step, r"targets \['used'\] are quantized"),
])
def test_refusals_leave_the_model_as_it_was(make, targets, step, match):
    model = make()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        preprocess_loraga(model, _config(targets), step(model))
    assert _no_state(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_requires_the_lora_ga_init():
    model = Net()
    with pytest.raises(ValueError, match="If you want to use LoRA-GA.*init_lora_weights=True"):
        preprocess_loraga(model, LoraConfig(target_modules=["used"]), _step(model))
    assert _no_state(model)


def test_a_second_preprocess_replaces_the_first():
    model = Net()
    preprocess_loraga(model, _config(("used", "idle")), _step(model))
    preprocess_loraga(model, _config(), lambda: model(X[0]).sum().backward())
    assert model not in _UNREACHED or not _UNREACHED[model]
    torch.testing.assert_close(model.used._peft_loraga_grad, torch.ones(5, 4) @ X[0])


_UPSTREAM_LOAD = """
import json, sys, torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraGAConfig
folder = sys.argv[1]
config = PeftConfig.from_pretrained(folder + "/adapter")
assert isinstance(config.lora_ga_config, LoraGAConfig), type(config.lora_ga_config)
base = torch.nn.Sequential(torch.nn.Linear(6, 5))
base[0].load_state_dict(torch.load(folder + "/offset_base.pt"))
model = PeftModel.from_pretrained(base, folder + "/adapter")
with torch.no_grad():
    out = model(torch.load(folder + "/x.pt"))
emit({"sub": [config.lora_ga_config.direction, config.lora_ga_config.scale], "out": out.tolist()})
"""


def test_upstream_reads_our_lora_ga_config_and_adapter(tmp_path):
    """Our adapter_config.json (sub-config with this package's extra `dtype` key) loads in upstream 0.21.2, which
    gives the same outputs on the offset base."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction="ArBr", scale="gd_scale"))
    preprocess_loraga(model, config, lambda: model(X[0]).pow(2).sum().backward())
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.base_model.model[0].lora_B["default"].weight.add_(0.1)  # "trained"
        ours = peft_model(X[1])
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    torch.save(peft_model.base_model.model[0].get_base_layer().state_dict(), tmp_path / "offset_base.pt")
    torch.save(X[1], tmp_path / "x.pt")
    try:
        result = run_upstream(_UPSTREAM_LOAD, args=[str(tmp_path)])
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    assert result.data["sub"] == ["ArBr", "gd_scale"]
    torch.testing.assert_close(torch.tensor(result.data["out"]), ours, rtol=0, atol=1e-5)
    again = PeftModel.from_pretrained(peft_model.base_model.model, str(tmp_path / "adapter"))
    torch.testing.assert_close(again(X[1]), ours, rtol=0, atol=1e-6)
