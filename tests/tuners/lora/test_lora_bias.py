"""`lora_bias=True`: lora_B carries a bias `b_B`, the layer computes `base(x) + s (B A x + b_B)`, merging adds
`s b_B` to the base bias (impossible when the base has none), and the key is `<path>.lora_B.bias` on disk."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.save_and_load import get_peft_model_state_dict

F64 = torch.float64


class Net(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.lin0 = nn.Linear(6, 7, bias=bias)
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=bias)

    def forward(self, ids):
        h = torch.tanh(self.lin0(self.emb(ids)))  # (N, L, 7)
        return self.conv(h.unsqueeze(1))


def _model(bias: bool = True, **config):
    torch.manual_seed(0)
    base = Net(bias).to(F64)
    kwargs = {"target_modules": ["lin0", "conv"], "lora_bias": True, "init_lora_weights": False, "r": 2,
              "lora_alpha": 6}
    kwargs.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return base, get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))


def _ids():
    return torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(1))


def test_forward_closed_form_and_init():
    _, model = _model()
    layer = model.base_model.model.lin0
    x = torch.randn(3, 6, dtype=F64)
    s, A, B = layer.scaling["default"], layer.lora_A["default"], layer.lora_B["default"]
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + s * (x @ A.weight.T @ B.weight.T + B.bias)
    torch.testing.assert_close(layer(x), expected)
    assert B.bias.shape == (7,) and B.bias.abs().sum() > 0  # init_lora_weights=False: random
    _, zero_init = _model(init_lora_weights=True)
    assert torch.equal(zero_init.base_model.model.lin0.lora_B["default"].bias, torch.zeros(7, dtype=F64))
    assert zero_init.base_model.model.conv.lora_B["default"].bias.shape == (3,)


def test_adapter_equals_merged_equals_reloaded_and_unmerge_restores(tmp_path):
    base, model = _model()
    ids = _ids()
    out = model(ids)
    assert not torch.allclose(out, base(ids))
    with model.disable_adapter():
        torch.testing.assert_close(model(ids), base(ids))
    model.merge_adapter()
    torch.testing.assert_close(model(ids), out)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.lin0.base_layer.bias, base.lin0.bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(model.base_model.model.conv.base_layer.bias, base.conv.bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(ids), out)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(reloaded(ids), out)
    torch.testing.assert_close(copy.deepcopy(model).merge_and_unload()(ids), out)


def test_saved_keys():
    _, model = _model()
    keys = set(get_peft_model_state_dict(model))
    assert {"base_model.model.lin0.lora_B.bias", "base_model.model.conv.lora_B.bias"} <= keys
    _, plain = _model(lora_bias=False)
    assert not any(k.endswith("lora_B.bias") for k in get_peft_model_state_dict(plain))


def test_base_without_bias_warns_and_merge_raises():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="`lora_bias=True` was passed but the targeted layer of type Linear has no"):
        model = get_peft_model(Net(bias=False), LoraConfig(target_modules=["lin0"], lora_bias=True))
    weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    for safe_merge in (False, True):
        with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
            model.merge_adapter(safe_merge=safe_merge)
        assert torch.equal(model.base_model.model.lin0.base_layer.weight, weight)
        assert model.base_model.model.lin0.merged_adapters == []


def test_safe_merge_refuses_non_finite_bias():
    _, model = _model()
    layer = model.base_model.model.lin0
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].bias.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)
    assert layer.merged_adapters == []


def test_refusals():
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        get_peft_model(Net(), LoraConfig(target_modules=["emb"], lora_bias=True))
    for init in ("gaussian", "lora_ga"):
        with pytest.raises(ValueError, match="The argument lora_bias=True is only supported with init_lora_weights"):
            LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights=init)
    from peft import LoraGAConfig, LoraProConfig

    with pytest.raises(ValueError, match="lora_bias=True with LoRA-GA"):
        LoraGAConfig(target_modules=["lin0"], lora_bias=True)
    LoraProConfig(target_modules=["lin0"], lora_bias=True)  # accepted: see test_lorapro_trains_the_bias_too


def test_lorapro_trains_the_bias_too():
    """LoRA-Pro adjusts the (A, B) gradients only; B's bias gets its exact gradient as an ordinary parameter."""
    from peft import LoraProConfig
    from peft.optimizers import LoraProAdamW

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraProConfig(target_modules=["0"], r=2, lora_bias=True))
    optimizer = LoraProAdamW(model, lr=1e-2)
    bias = model.base_model.model[0].lora_B["default"].bias
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    losses = []
    for _ in range(5):
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and bias.abs().sum() > 0


def test_bias_trains():
    _, model = _model(init_lora_weights=True)
    bias = model.base_model.model.lin0.lora_B["default"].bias
    assert bias.requires_grad
    model(_ids()).pow(2).mean().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
