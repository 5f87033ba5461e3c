"""AdaLoRA details upstream's own tests rely on: half-precision Conv2d adapters without autocast, and the
`bias="adalora_only"` spelling of `"lora_only"`."""

import pytest
import torch
from torch import nn

from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraLayer


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.lin = nn.Linear(3 * 4 * 4, 4)
        self.other = nn.Linear(4, 2)

    def forward(self, img):
        return self.other(self.lin(self.conv(img).flatten(1)))


def _config(**kw):
    return AdaLoraConfig(total_step=10, init_r=3, target_r=2, lora_alpha=4, target_modules=["conv", "lin"], **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conv2d_adapter_without_autocast_matches_fp32(dtype):
    torch.manual_seed(0)
    base = ConvNet()
    img = torch.randn(2, 2, 4, 4)
    model = get_peft_model(ConvNet().to(dtype), _config(init_lora_weights=False), autocast_adapter_dtype=False)
    layer = model.base_model.model.conv
    assert isinstance(layer, AdaLoraLayer) and layer.lora_A["default"].dtype == dtype
    out = model(img.to(dtype))
    assert out.dtype == dtype
    # the same adapter in fp32, from the half weights
    ref = get_peft_model(base, _config(init_lora_weights=False))
    with torch.no_grad():
        for (name, p), (ref_name, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert name == ref_name
            q.copy_(p.float())
    torch.testing.assert_close(out.float(), ref(img), rtol=0.05, atol=0.05)


def test_bias_adalora_only_trains_the_adapted_layers_biases():
    config = _config(bias="adalora_only")
    assert config.bias == "adalora_only"
    model = get_peft_model(ConvNet(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("conv.base_layer.bias") for n in trainable)
    assert any(n.endswith("lin.base_layer.bias") for n in trainable)
    assert not any(n.endswith("other.bias") for n in trainable)
    with pytest.raises(ValueError, match="bias"):
        _config(bias="vera_only")
