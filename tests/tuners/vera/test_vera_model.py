"""VeraModel / VeRA layers on small models: init, closed-form forward, merge, disable, save / load, several
adapters, training."""

from __future__ import annotations

import pytest
import torch

from peft import PeftModel, VeraConfig, get_peft_model
from peft.tuners.vera import VeraLayer
from peft.tuners.vera.projections import draw_projections

from ._nets import TARGETS, build_net, inputs


def _vera(net=None, dtype=torch.float64, **kw):
    kw = {"r": 4, "target_modules": TARGETS, **kw}
    return get_peft_model(net if net is not None else build_net(dtype), VeraConfig(**kw))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_init_leaves_output_unchanged_and_only_lambdas_train():
    base_out = build_net(torch.float64)(inputs(torch.float64))
    model = _vera()
    assert torch.equal(model(inputs(torch.float64)), base_out)  # lambda_b = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vera_lambda_" in n for n in trainable)
    layer = model.base_model.model.lin0
    assert torch.all(layer.vera_lambda_d["default"] == 0.1) and torch.all(layer.vera_lambda_b["default"] == 0)
    assert model.base_model.vera_A["default"].shape == (4, 20)  # max in over lin0/1/2 = 20
    assert model.base_model.vera_B["default"].shape == (20, 4)  # max out = 20
    assert not model.base_model.vera_A["default"].requires_grad


def test_forward_matches_closed_form_float64():
    model = _vera(projection_prng_key=11)
    _randomize(model)
    net = build_net(torch.float64)
    A, B = (t.to(torch.float64) for t in draw_projections(11, 4, 20, 20, dtype=torch.float32))
    x = inputs(torch.float64)

    def adapted(name, h):
        lin, layer = getattr(net, name), getattr(model.base_model.model, name)
        d, b = layer.vera_lambda_d["default"].detach(), layer.vera_lambda_b["default"].detach()
        W = lin.weight + torch.diag(b) @ B[: lin.out_features] @ torch.diag(d) @ A[:, : lin.in_features]
        return torch.nn.functional.linear(h, W, lin.bias)

    h = torch.tanh(adapted("lin0", x))
    h = torch.tanh(adapted("lin1", h))
    expected = net.head(torch.tanh(adapted("lin2", h)))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


def test_merge_unmerge_disable():
    model = _vera()
    _randomize(model)
    x = inputs(torch.float64)
    base_out, out = build_net(torch.float64)(x), model(x)
    assert (out - base_out).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.lin0.base_layer.weight, build_net(torch.float64).lin0.weight,
                               rtol=0, atol=1e-14)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, VeraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip(tmp_path, save_projection):
    model = _vera(save_projection=save_projection, projection_prng_key=3)
    _randomize(model)
    x = inputs(torch.float64)
    out = model(x)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in keys) == save_projection and ("base_model.vera_B" in keys) == save_projection
    assert "base_model.model.lin0.vera_lambda_b" in keys and "base_model.model.lin2.vera_lambda_d" in keys
    assert not any(".default" in k for k in keys)
    loaded = PeftModel.from_pretrained(build_net(torch.float64), tmp_path)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=1e-12)
    torch.testing.assert_close(loaded.merge_and_unload()(x), out, rtol=0, atol=1e-12)


def test_saved_projection_wins_over_the_key(tmp_path):
    model = _vera(projection_prng_key=3)
    _randomize(model)
    with torch.no_grad():
        model.base_model.vera_A["default"].mul_(2)  # no longer what the key draws
    out = model(inputs(torch.float64))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_net(torch.float64), tmp_path)
    torch.testing.assert_close(loaded(inputs(torch.float64)), out, rtol=0, atol=1e-12)


def test_two_adapters_switch_delete_and_save(tmp_path):
    model = _vera()
    model.add_adapter("other", VeraConfig(r=2, target_modules=["lin1"], projection_prng_key=9))
    _randomize(model, seed=1)
    x = inputs(torch.float64)
    out_default = model(x)
    model.set_adapter("other")
    out_other = model(x)
    assert (out_other - out_default).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    assert model.base_model.vera_A["other"].shape == (2, 20) and model.base_model.vera_B["other"].shape == (12, 2)
    model.base_model.set_adapter(["default", "other"])
    both = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_net(torch.float64), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(loaded(x), both, rtol=0, atol=1e-12)
    model.delete_adapter("other")
    assert "other" not in model.base_model.vera_A and "other" not in model.base_model.vera_B
    torch.testing.assert_close(model(x), out_default, rtol=0, atol=1e-12)


def test_gpt2_conv1d_merge_and_fan_in_fan_out():
    from tests.helpers.tiny_models import tiny_gpt2, token_ids

    ids = token_ids()
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_peft_model(tiny_gpt2(torch.float64), VeraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    assert model.peft_config["default"].fan_in_fan_out is True
    _randomize(model)
    out = model(ids).logits
    base = tiny_gpt2(torch.float64)(ids).logits
    assert (out - base).abs().max() > 1e-4
    torch.testing.assert_close(model.merge_and_unload()(ids).logits, out, rtol=0, atol=1e-10)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = _vera(dtype=torch.float32, r=8)
    x, target = inputs(torch.float32, batch=32), torch.randn(32, 3, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("bad", [dict(r=0), dict(bias="lora_only"), dict(vera_dropout=1.5), dict(d_initial=None),
                                 dict(save_projection="yes"), dict(layers_pattern="layers")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="Invalid|layers_pattern"):
        VeraConfig(target_modules=TARGETS, **bad)


def test_unsupported_target_leaves_model_unchanged():
    net = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4))
    with pytest.raises((ValueError, TypeError)):
        get_peft_model(net, VeraConfig(r=2, target_modules=["0", "1"]))
    assert type(net[0]) is torch.nn.Embedding and type(net[1]) is torch.nn.Linear
    assert all(p.requires_grad for p in net.parameters())


def test_bias_vera_only_trains_adapted_biases():
    model = _vera(bias="vera_only")
    assert model.base_model.model.lin0.base_layer.bias.requires_grad
    assert not model.base_model.model.head.bias.requires_grad


def test_low_cpu_mem_usage_load_and_bf16_base(tmp_path):
    model = _vera(dtype=torch.float32)
    _randomize(model)
    out = model(inputs(torch.float32))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_net(torch.float32), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(inputs(torch.float32)), out, rtol=0, atol=1e-6)
    half = PeftModel.from_pretrained(build_net(torch.bfloat16), tmp_path)
    assert half.base_model.model.lin0.vera_lambda_b["default"].dtype == torch.float32  # trained in fp32
    y = half(inputs(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and (y.float() - out).abs().max() < 0.1


def test_inject_adapter_in_model_is_refused():
    from peft import inject_adapter_in_model

    with pytest.raises(ValueError, match="shared"):
        inject_adapter_in_model(VeraConfig(r=2, target_modules=TARGETS), build_net())
