"""LoRA on Conv1d / Conv2d / Conv3d, grouped or not: the composed-kernel math in float64 against a closed form,
the layer against `conv(x, W) + conv(x, s K)`, merge / unmerge / disable, refused inputs, save / load, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Conv1d, Conv2d, Conv3d
from peft.tuners.lora.conv import ConvMergeError
from peft.tuners.lora.conv_math import check_rank_divides_groups, conv_delta_kernel

D = torch.float64
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
LAYER = {1: Conv1d, 2: Conv2d, 3: Conv3d}
BASE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _kernel_by_loops(A: torch.Tensor, B: torch.Tensor, s: float, groups: int) -> torch.Tensor:
    """K[o] = s * sum_q B[o, q] A[j r/g + q], j = o // (c_out / g): the definition, one output channel at a time."""
    r, c_out = A.shape[0], B.shape[0]
    per_r, per_out = r // groups, c_out // groups
    K = torch.zeros(c_out, *A.shape[1:], dtype=D)
    for o in range(c_out):
        j = o // per_out
        for q in range(per_r):
            K[o] += B[o, q].reshape(()) * A[j * per_r + q]
    return s * K


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_delta_kernel_matches_definition_and_composed_convs(dim, groups):
    torch.manual_seed(dim * 10 + groups)
    c_in, c_out, r, k = 4, 8, 4, 3
    A = torch.randn(r, c_in, *([k] * dim), dtype=D)
    B = torch.randn(c_out, r // groups, *([1] * dim), dtype=D)
    K = conv_delta_kernel(A, B, 0.5, groups)
    assert K.shape == (c_out, c_in, *([k] * dim)) and K.dtype == D
    torch.testing.assert_close(K, _kernel_by_loops(A, B, 0.5, groups), atol=1e-13, rtol=0)
    x = torch.randn(2, c_in, *([6] * dim), dtype=D)
    conv = CONV_FN[dim]
    composed = 0.5 * conv(conv(x, A, padding=1), B, groups=groups)  # B(A(x)) as two convs
    torch.testing.assert_close(conv(x, K, padding=1), composed, atol=1e-12, rtol=0)


def test_delta_kernel_on_integers_groups_one_is_b_at_a():
    A = torch.tensor([[[1.0, 2.0]], [[0.0, -1.0]]], dtype=D)  # (r=2, c_in=1, k=2)
    B = torch.tensor([[[3.0], [1.0]], [[-2.0], [4.0]]], dtype=D)  # (c_out=2, r=2, 1)
    expected = torch.tensor([[[3.0, 5.0]], [[-2.0, -8.0]]], dtype=D)
    assert torch.equal(conv_delta_kernel(A, B, 1.0, 1), expected)


def test_rank_not_divisible_by_groups_is_named():
    with pytest.raises(ValueError, match=r"r=3.*groups=2"):
        check_rank_divides_groups(3, 2)
    with pytest.raises(ValueError, match="does not fit"):
        conv_delta_kernel(torch.zeros(4, 2, 3), torch.zeros(6, 4, 1), 1.0, groups=2)


def _layer(dim, groups=1, r=4, alpha=8, **conv_kwargs):
    torch.manual_seed(dim + groups)
    base = BASE[dim](4, 6 if groups != 4 else 8, 3, groups=groups, dtype=D, **conv_kwargs)
    layer = LAYER[dim](base, "default", r=r, lora_alpha=alpha, init_lora_weights=False)
    return base, layer


@pytest.mark.parametrize(
    ("dim", "groups", "conv_kwargs"),
    [(1, 1, dict(padding=1)), (1, 2, dict(stride=2)), (1, 1, dict(padding=2, dilation=2, padding_mode="circular")),
     (2, 2, dict(padding=1)), (2, 4, dict(stride=2, padding=1)), (3, 1, dict(stride=2, padding=1)),
     (3, 2, dict(padding=1))],
)
def test_layer_forward_closed_form_merge_disable(dim, groups, conv_kwargs):
    base, layer = _layer(dim, groups, **conv_kwargs)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (4, 4, *([3] * dim)) and B.shape == (base.out_channels, 4 // groups, *([1] * dim))
    x = torch.randn(2, 4, *([7] * dim), dtype=D)
    base_y = base(x)
    y = layer(x)
    delta_y = base._conv_forward(x, layer.get_delta_weight("default"), None) if groups == 1 else CONV_FN[dim](
        x, layer.get_delta_weight("default"), None, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(y, base_y + delta_y, atol=1e-12, rtol=0)
    assert (y - base_y).abs().max() > 1e-3
    weight = base.weight.detach().clone()
    if groups == 1:
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=0)
        layer.unmerge()
        torch.testing.assert_close(base.weight, weight, atol=1e-14, rtol=0)
    else:
        with pytest.raises(ValueError, match=f"groups={groups}"):
            layer.merge()
        with pytest.raises(NotImplementedError) as info:  # upstream's exception type
            layer.merge(safe_merge=True)
        assert isinstance(info.value, ConvMergeError)
        assert not layer.merged and torch.equal(base.weight, weight)
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base_y, atol=1e-12, rtol=0)


def test_bad_rank_for_groups_is_refused_and_model_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(ValueError, match=r"r=3.*groups=2"):
        get_peft_model(model, LoraConfig(r=3, target_modules=["0"]))
    assert type(model[0]) is nn.Conv2d
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"r=5.*groups=2"):
        peft_model.add_adapter("second", LoraConfig(r=5, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    assert list(layer.lora_A) == ["default"] and "second" not in layer.r


def test_wrong_conv_type_is_refused():
    with pytest.raises(ValueError, match="Conv3d"):
        Conv3d(nn.Conv2d(2, 2, 1), "default", r=2)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c3 = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: (b, 3, 8)
        h = torch.relu(self.c1(x))  # (b, 4, 8)
        h = self.c3(h.reshape(h.shape[0], 4, 2, 2, 2))
        return self.head(h.mean(dim=(2, 3, 4)))


def test_model_adapter_equals_merged_equals_reloaded(tmp_path):
    torch.manual_seed(0)
    model = _Net().to(D)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 8, dtype=D)
    base_y = model(x)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c3"],
                                                  init_lora_weights=False))
    assert type(peft_model.base_model.model.c1) is Conv1d and type(peft_model.base_model.model.c3) is Conv3d
    y = peft_model(x)
    assert (y - base_y).abs().max() > 1e-4
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(x), base_y, atol=0, rtol=0)
    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(x), y, atol=1e-12, rtol=0)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(peft_model(x), y, atol=1e-12, rtol=0)
    peft_model.save_pretrained(tmp_path)
    fresh = _Net().to(D)
    fresh.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(reloaded(x), y, atol=1e-12, rtol=0)
    merged = reloaded.merge_and_unload()
    assert type(merged.c1) is nn.Conv1d and type(merged.c3) is nn.Conv3d
    torch.testing.assert_close(merged(x), y, atol=1e-12, rtol=0)


def test_grouped_conv_save_load_and_training_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(6 * 25, 1)).to(D)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x, target = torch.randn(4, 4, 5, 5, dtype=D), torch.randn(4, 1, dtype=D)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.0.lora_A.default.weight", "base_model.model.0.lora_B.default.weight"}
    losses = []
    for _ in range(3):
        loss = F.mse_loss(peft_model(x), target)
        opt.zero_grad()
        loss.backward()
        layer = peft_model.base_model.model[0]
        for factor in (layer.lora_A["default"], layer.lora_B["default"]):
            assert factor.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for key, value in peft_model.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base_state[key.replace("base_layer.", "")])
    y = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(6 * 25, 1)).to(D)
    fresh.load_state_dict(base_state)
    torch.testing.assert_close(PeftModel.from_pretrained(fresh, tmp_path)(x), y, atol=1e-12, rtol=0)
