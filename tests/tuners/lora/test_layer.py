"""LoRA layers on hand-built integer matrices (exact in float64), their init, dtypes, merging and adapters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.lora import Conv2d, Embedding, Linear
from tests.helpers.lora_checks import reference_output

D = torch.float64
W = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]], dtype=D)  # (out=2, in=3)
A = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]], dtype=D)  # (r=2, in=3)
B = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=D)  # (out=2, r=2)
X = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 2.0]], dtype=D)  # (batch=2, in=3)


def _linear(alpha: float = 4.0, rslora: bool = False) -> Linear:
    base = nn.Linear(3, 2, dtype=D)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(torch.tensor([0.5, -0.5], dtype=D))
    layer = Linear(base, "default", r=2, lora_alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def test_linear_forward_and_delta_on_integers():
    layer = _linear(alpha=4.0)  # s = 4 / 2 = 2
    expected = X @ W.T + torch.tensor([0.5, -0.5], dtype=D) + 2 * X @ A.T @ B.T
    assert torch.equal(layer(X), expected)
    assert torch.equal(layer.get_delta_weight("default"), 2 * B @ A)
    assert layer.scaling["default"] == 2.0 and layer.r["default"] == 2
    rs = _linear(alpha=4.0, rslora=True)
    assert rs.scaling["default"] == pytest.approx(4 / math.sqrt(2), rel=1e-15)


def test_linear_merge_unmerge_exact():
    layer = _linear()
    y = layer(X)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert torch.equal(layer.get_base_layer().weight, W + 2 * B @ A)
    assert torch.equal(layer(X), y)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
        layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, W) and not layer.merged


def test_disabled_layer_computes_the_base_even_when_merged():
    layer = _linear()
    base_y = X @ W.T + torch.tensor([0.5, -0.5], dtype=D)
    layer.merge()
    layer.enable_adapters(False)
    assert torch.equal(layer(X), base_y)
    assert not layer.merged, "a disabled layer unmerges before computing the base output"
    layer.enable_adapters(True)
    assert torch.equal(layer(X), base_y + 2 * X @ A.T @ B.T)


def test_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(2, 3).to(D)  # weight stored (in=3, out=2)
    with torch.no_grad():
        base.weight.copy_(W.T)
        base.bias.zero_()
    layer = Linear(base, "default", r=2, lora_alpha=2, fan_in_fan_out=True)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    assert (layer.in_features, layer.out_features) == (3, 2)
    assert torch.equal(layer(X), X @ W.T + X @ A.T @ B.T)
    assert torch.equal(layer.get_delta_weight("default"), (B @ A).T)
    y = layer(X)
    layer.merge()
    assert torch.equal(layer.get_base_layer().weight, (W + B @ A).T)
    assert torch.equal(layer(X), y)


def test_embedding_forward_merge():
    base = nn.Embedding(5, 2, dtype=D)
    layer = Embedding(base, "default", r=2, lora_alpha=2)
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0, "A starts at zero, B random"
    assert torch.count_nonzero(layer.lora_embedding_B["default"]) > 0
    ea = torch.arange(10, dtype=D).reshape(2, 5) - 4  # (r, vocab)
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(ea)
        layer.lora_embedding_B["default"].copy_(B)
    ids = torch.tensor([[0, 4, 2], [1, 1, 3]])
    expected = base.weight[ids] + ea.T[ids] @ B.T
    assert torch.equal(layer(ids), expected)
    assert layer.get_delta_weight("default").shape == base.weight.shape
    weight = base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer(ids), expected)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, atol=1e-14, rtol=0)


@pytest.mark.parametrize(("stride", "padding"), [(1, 1), (2, 0)])
def test_conv2d_forward_merge(stride, padding):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, kernel_size=3, stride=stride, padding=padding, dtype=D)
    layer = Conv2d(base, "default", r=2, lora_alpha=4, init_lora_weights=False)
    assert layer.lora_A["default"].weight.shape == (2, 3, 3, 3) and layer.lora_B["default"].weight.shape == (4, 2, 1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    y = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = F.conv2d(x, base.weight, base.bias, stride, padding) + 2 * F.conv2d(F.conv2d(x, a, None, stride,
                                                                                            padding), b)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    weight = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, atol=1e-14, rtol=0)


def test_conv2d_with_groups_needs_rank_divisible_by_groups():  # grouped convs: see test_conv_nd.py
    with pytest.raises(ValueError, match="r=3 is not divisible by groups=2"):
        Conv2d(nn.Conv2d(4, 4, 3, groups=2), "default", r=3)


def test_init_modes():
    torch.manual_seed(0)
    base = nn.Linear(256, 64)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    default = Linear(base, "default", r=4)
    a = default.lora_A["default"].weight.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() == pytest.approx(bound / 3**0.5,
                                                                                                 rel=0.1)
    assert torch.count_nonzero(default.lora_B["default"].weight) == 0
    gauss = Linear(nn.Linear(256, 64), "default", r=4, init_lora_weights="gaussian")
    assert gauss.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert torch.count_nonzero(gauss.lora_B["default"].weight) == 0
    off = Linear(nn.Linear(256, 64), "default", r=4, init_lora_weights=False)
    assert torch.count_nonzero(off.lora_B["default"].weight) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_keeps_fp32_adapter_and_merges_in_fp32(dtype):
    torch.manual_seed(0)
    base = nn.Linear(8, 4).to(dtype)
    layer = Linear(base, "default", r=2, lora_alpha=2, init_lora_weights=False)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 8).to(dtype)
    assert layer(x).dtype == dtype
    weight = base.weight.detach().clone()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # fp32, s = 1
    layer.merge()
    assert torch.equal(base.weight, (weight.float() + delta).to(dtype)), "merge rounds once to the base dtype"


def test_lora_dropout_touches_only_the_lora_branch():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 16), "default", r=4, lora_dropout=0.5)
    x = torch.randn(8, 16)
    base_y = layer.get_base_layer()(x)
    layer.train()
    assert torch.equal(layer(x), base_y), "with B = 0 dropout cannot change the output"
    nn.init.normal_(layer.lora_B["default"].weight)
    assert not torch.equal(layer(x), layer(x)), "train mode draws a fresh dropout mask"
    layer.eval()
    torch.testing.assert_close(layer(x), reference_output(layer, x))


def test_several_adapters_in_one_layer():
    layer = _linear()
    layer.update_layer("other", r=1, lora_alpha=3, init_lora_weights=False)
    assert layer.active_adapters == ["default"], "adding an adapter does not activate it"
    assert not layer.lora_A["other"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    y_default = layer(X)
    layer.set_adapter(["default", "other"])
    a2, b2 = layer.lora_A["other"].weight, layer.lora_B["other"].weight
    torch.testing.assert_close(layer(X), y_default + 3 * X @ a2.T @ b2.T, atol=1e-12, rtol=0)
    layer.merge(adapter_names=["other"])
    assert layer.merged_adapters == ["other"]
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, W)
    layer.delete_adapter("default")
    assert set(layer.lora_A) == {"other"} and set(layer.scaling) == {"other"}
    assert layer.active_adapters == ["other"]


def test_update_layer_rejects_bad_rank():
    with pytest.raises(ValueError, match="r must be a positive int"):
        Linear(nn.Linear(3, 2), "default", r=0)
