"""AdaLoRA layers: float64 closed-form forward, init, merge / unmerge, disabled == base (Linear, Conv1D, Conv2d)."""

import pytest
import torch
from torch import nn

from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraLayer, SVDConv2d, SVDLinear

F64 = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.out = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x, img):
        return self.lin(x), self.out(self.conv(img).flatten(1))


def _randomize(model, adapter="default"):
    """Give every factor (E included) non-zero values so that the adapter changes the output."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_A:
            for attr in ("lora_A", "lora_E", "lora_B"):
                getattr(module, attr)[adapter].data.normal_(0, 0.5)


def _model(**kw):
    torch.manual_seed(0)
    base = Net().to(F64)
    config = AdaLoraConfig(total_step=10, init_r=3, target_r=2, lora_alpha=4, target_modules=["lin", "conv"], **kw)
    return base, config


def _inputs():
    torch.manual_seed(2)
    return torch.randn(7, 6, dtype=F64), torch.randn(2, 2, 4, 4, dtype=F64)


def test_layer_types_and_shapes():
    base, config = _model()
    model = get_peft_model(base, config)
    lin, conv = model.base_model.model.lin, model.base_model.model.conv
    assert isinstance(lin, SVDLinear) and isinstance(conv, SVDConv2d)
    assert lin.lora_A["default"].shape == (3, 6) and lin.lora_E["default"].shape == (3, 1)
    assert lin.lora_B["default"].shape == (5, 3) and lin.ranknum["default"].item() == 3.0
    assert not lin.ranknum["default"].requires_grad
    assert conv.lora_A["default"].shape == (3, 2 * 3 * 3) and conv.lora_B["default"].shape == (3, 3)
    assert lin.lora_A["default"].dtype == F64
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3 * (5 + 6 + 1) + 3 * (3 + 18 + 1)  # r (m + n + 1) per adapted weight


def test_init_keeps_output_then_closed_form_forward():
    base, config = _model()
    x, img = _inputs()
    with torch.no_grad():
        ref_lin, ref_conv = base(x, img)
        w, b = base.lin.weight.clone(), base.lin.bias.clone()
        cw = base.conv.weight.clone()
    model = get_peft_model(base, config)
    out_lin, out_conv = model(x, img)
    torch.testing.assert_close(out_lin, ref_lin, rtol=0, atol=0)  # E = 0 at init
    torch.testing.assert_close(out_conv, ref_conv, rtol=0, atol=0)
    _randomize(model)
    lin = model.base_model.model.lin
    a, e, bb = lin.lora_A["default"], lin.lora_E["default"], lin.lora_B["default"]
    delta = bb @ torch.diag(e[:, 0]) @ a * 4 / (3 + 1e-5)  # B diag(E) A * alpha / (ranknum + 1e-5)
    out_lin, out_conv = model(x, img)
    torch.testing.assert_close(out_lin, x @ (w + delta).T + b)
    conv = model.base_model.model.conv
    kernel = (conv.lora_B["default"] @ torch.diag(conv.lora_E["default"][:, 0]) @ conv.lora_A["default"]) * 4 / (
        3 + 1e-5)
    expected = nn.functional.conv2d(img, cw + kernel.reshape(cw.shape), base.conv.bias, padding=1)
    torch.testing.assert_close(out_conv, model.base_model.model.out(expected.flatten(1)))
    assert (out_lin - ref_lin).abs().max() > 1e-3


def test_merge_unmerge_disable():
    base, config = _model()
    x, img = _inputs()
    with torch.no_grad():
        ref = base(x, img)
        weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    _randomize(model)
    with torch.no_grad():
        adapted = model(x, img)
        with model.disable_adapter():
            disabled = model(x, img)
        model.merge_adapter()
        merged = model(x, img)
        model.unmerge_adapter()
        unmerged = model(x, img)
    for got, want in zip(disabled, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(merged, adapted):
        torch.testing.assert_close(got, want)
    for got, want in zip(unmerged, adapted):
        torch.testing.assert_close(got, want)
    assert (adapted[0] - ref[0]).abs().max() > 1e-3 and (adapted[1] - ref[1]).abs().max() > 1e-3
    base_now = model.base_model.model
    torch.testing.assert_close(base_now.lin.base_layer.weight, weights["lin.weight"])
    torch.testing.assert_close(base_now.conv.base_layer.weight, weights["conv.weight"])
    plain = model.merge_and_unload()
    assert isinstance(plain.lin, nn.Linear) and isinstance(plain.conv, nn.Conv2d)
    with torch.no_grad():
        for got, want in zip(plain(x, img), adapted):
            torch.testing.assert_close(got, want)


def test_conv1d_fan_in_fan_out_matches_linear_math():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    parent = nn.Sequential(Conv1D(5, 6)).to(F64)  # weight (in=6, out=5)
    x = torch.randn(3, 6, dtype=F64)
    w, b = parent[0].weight.clone(), parent[0].bias.clone()
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_peft_model(parent, AdaLoraConfig(total_step=5, init_r=2, target_r=1, target_modules=["0"]))
    assert model.peft_config["default"].fan_in_fan_out
    _randomize(model)
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].shape == (2, 6) and layer.lora_B["default"].shape == (5, 2)
    delta = layer.get_delta_weight("default")
    assert delta.shape == (6, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (w + delta) + b)
        expected = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected)


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    base, config = _model()
    model = get_peft_model(base, config)
    lin = model.base_model.model.lin
    lin.lora_E["default"].data.fill_(float("inf"))
    before = lin.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN"):
        lin.merge(safe_merge=True)
    torch.testing.assert_close(lin.base_layer.weight, before, rtol=0, atol=0)
    assert not lin.merged


def test_unsupported_target_and_grouped_conv_are_refused():
    model = nn.Sequential(nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="not supported by AdaLoRA"):
        get_peft_model(model, AdaLoraConfig(total_step=3, target_modules=["0"]))
    assert isinstance(model[0], nn.Embedding)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        get_peft_model(grouped, AdaLoraConfig(total_step=3, target_modules=["0"]))
    assert isinstance(grouped[0], nn.Conv2d)


def test_init_false_gives_random_factors():
    base, config = _model(init_lora_weights=False)
    x, img = _inputs()
    with torch.no_grad():
        ref = base(x, img)[0]
    model = get_peft_model(base, config)
    with torch.no_grad():
        assert (model(x, img)[0] - ref).abs().max() > 1e-3
