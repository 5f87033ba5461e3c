"""DoRA on bitsandbytes 4-bit and 8-bit layers (CPU): the magnitude and the norm come from the dequantized weight,
the forward equals a float twin holding the dequantized weights, merging requantizes `m / ||W + dW||_c (W + dW)`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast", "ignore:Merging LoRA weights")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils.quantization import dequantize_bnb_layer  # noqa: E402
from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

TARGETS = ["four", "eight"]


class _Bnb(nn.Module):
    def __init__(self):
        super().__init__()
        self.four = bnb.nn.Linear4bit(128, 128, compute_dtype=torch.float32, quant_type="nf4")
        self.four.weight = bnb.nn.Params4bit(torch.randn(128, 128) * 0.05, requires_grad=False, quant_type="nf4",
                                             module=self.four)
        self.eight = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0)
        self.eight.weight = bnb.nn.Int8Params(torch.randn(64, 128) * 0.05, requires_grad=False,
                                              has_fp16_weights=False)

    def forward(self, x):
        return self.eight(self.four(x))


def _float_twin(model: nn.Module) -> nn.Module:
    twin = nn.Module()
    twin.four, twin.eight = nn.Linear(128, 128), nn.Linear(128, 64)
    for key in TARGETS:
        base = getattr(model, key)
        getattr(twin, key).weight.data = dequantize_bnb_layer(base)
        getattr(twin, key).bias.data = base.bias.detach().float().clone()
    twin.forward = lambda x: twin.eight(twin.four(x))
    return twin


def _config():
    return LoraConfig(target_modules=TARGETS, use_dora=True, init_lora_weights=False, r=4, lora_alpha=8)


def _dora_model():
    torch.manual_seed(0)
    model = _Bnb().to("cpu")
    twin = _float_twin(model)
    peft_model = get_peft_model(model, _config())
    return peft_model, twin


def test_magnitude_starts_at_the_dequantized_norm_and_forward_matches_float_twin():
    peft_model, twin = _dora_model()
    for _, layer in peft_model.base_model.tuner_layers():
        W = dequantize_bnb_layer(layer.get_base_layer())
        expected = (W + layer.get_delta_weight("default")).norm(dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, expected, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=g))
    twin_peft = get_peft_model(twin, _config())
    set_peft_model_state_dict(twin_peft, get_peft_model_state_dict(peft_model))
    x = torch.randn(6, 128, generator=g)
    peft_model.train(), twin_peft.train()  # dropout 0; train mode: no int8 activations
    with torch.no_grad():
        out, reference = peft_model(x), twin_peft(x)
        with peft_model.disable_adapter():
            base = peft_model(x)
    rel = ((out - reference).abs().max() / reference.abs().max()).item()
    assert rel < 1e-4
    assert ((base - reference).abs().max() / reference.abs().max()).item() > 1e-2  # DoRA changed the output


@pytest.mark.parametrize("key", TARGETS)
def test_merge_requantizes_the_dora_weight_and_unmerge_restores(key):
    peft_model, _ = _dora_model()
    layer = dict(peft_model.base_model.tuner_layers())[key]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.7, 1.4, layer.out_features))
    base = layer.get_base_layer()
    W = dequantize_bnb_layer(base)
    dW = layer.get_delta_weight("default")
    m = layer.lora_magnitude_vector["default"].weight.detach()
    expected = (m / (W + dW).norm(dim=1))[:, None] * (W + dW)
    layer.merge()
    merged = dequantize_bnb_layer(base)
    assert (merged - expected).norm() < 0.5 * (expected - W).norm()  # one requantization away from the target
    layer.unmerge()
    restored = dequantize_bnb_layer(base)
    assert (restored - W).norm() < 0.5 * (expected - W).norm()
    assert not layer.merged


def test_training_step_changes_the_magnitude_on_4bit():
    peft_model, _ = _dora_model()
    peft_model.train()
    magnitude = peft_model.base_model.model.four.lora_magnitude_vector["default"].weight
    before = magnitude.detach().clone()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model(torch.randn(4, 128)).pow(2).mean().backward()
    assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, magnitude.detach())
