"""TiedLoraModel on small nets: init, closed-form forward, tying (shared tensors and gradients from every layer),
merge, disable, save / load (tying survives), flags, several adapters, training."""

from __future__ import annotations

import pytest
import torch

from peft import PeftModel, TiedLoraConfig, get_peft_model
from peft.tuners.tiedlora import TiedLoraLayer

from ._nets import STACK_TARGETS, Parallel, build, inputs


def _tied(net=None, **kw):
    kw = {"r": 3, "lora_alpha": 6, "target_modules": STACK_TARGETS, **kw}
    return get_peft_model(net if net is not None else build(), TiedLoraConfig(**kw))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.base_model.named_parameters():
            if "tied_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _layers(model):
    return {n.split(".")[-1]: m for n, m in model.base_model.model.named_modules() if isinstance(m, TiedLoraLayer)}


def test_init_leaves_output_unchanged_and_groups_by_shape():
    x = inputs()
    model = _tied()
    assert torch.equal(model(x), build()(x))
    tuner = model.base_model
    assert sorted(tuner.tied_A["default"].keys()) == ["5x8", "8x8"]
    layers = _layers(model)
    for name in ("lin0", "lin1", "lin2"):
        A, B = layers[name].shared_pair("default")
        assert A is tuner.tied_A["default"]["8x8"] and B is tuner.tied_B["default"]["8x8"]
        assert layers[name].tied_A["default"] is A  # the trainable alias is the same Parameter
    assert layers["proj"].shared_pair("default")[1].shape == (5, 3)
    # trainable: 8x8 pair (48) + 5x8 pair (24 + 15) + u, v per layer (3 * (3 + 8) + (3 + 5))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 48 + 39 + 33 + 8
    assert all(p.requires_grad == ("tied_" in n) for n, p in model.named_parameters())


def test_no_scalings_variant_inits_B_zero_and_has_no_vectors():
    x = inputs()
    model = _tied(train_scalings=False)
    assert torch.equal(model(x), build()(x))
    layer = _layers(model)["lin0"]
    assert len(layer.tied_u) == 0 and torch.all(layer.shared_pair("default")[1] == 0)


def test_forward_matches_closed_form_float64():
    model = _tied()
    _randomize(model)
    net, layers, x = build(), _layers(model), inputs()

    def adapted(name, h):
        lin, layer = getattr(net, name), layers[name]
        A, B = (t.detach() for t in layer.shared_pair("default"))
        u, v = layer.tied_u["default"].detach(), layer.tied_v["default"].detach()
        W = lin.weight + 2.0 * torch.diag(v) @ B @ torch.diag(u) @ A  # s = 6 / 3
        return torch.nn.functional.linear(h, W, lin.bias)

    h = x
    for name in ("lin0", "lin1", "lin2"):
        h = torch.tanh(adapted(name, h))
    expected = net.head(torch.tanh(adapted("proj", h)))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


def test_gradients_reach_the_tied_pair_from_every_layer():
    model = _tied(build(Parallel), target_modules=["b0", "b1", "b2"])
    _randomize(model)
    x, c = inputs(n=6), torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    tuner, layers = model.base_model, _layers(model)
    A, B = tuner.tied_A["default"]["4x6"], tuner.tied_B["default"]["4x6"]

    def grads():
        model.zero_grad()
        (model(x) * c).sum().backward()
        return A.grad.clone(), B.grad.clone()

    total = grads()
    parts = []
    saved = {k: layer.tied_v["default"].detach().clone() for k, layer in layers.items()}
    for keep in layers:  # only branch `keep`'s v is non-zero: the gradient flows through that branch alone
        with torch.no_grad():
            for k, layer in layers.items():
                layer.tied_v["default"].copy_(saved[k] if k == keep else torch.zeros_like(saved[k]))
        parts.append(grads())
        assert parts[-1][0].abs().max() > 1e-6 and parts[-1][1].abs().max() > 1e-6, keep
    for i in range(2):
        torch.testing.assert_close(total[i], sum(p[i] for p in parts), rtol=0, atol=1e-12)


def test_merge_unmerge_disable():
    model = _tied()
    _randomize(model)
    x = inputs()
    base_out, out = build()(x), model(x)
    assert (out - base_out).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.lin1.base_layer.weight, build().lin1.weight, rtol=0,
                               atol=1e-14)
    torch.testing.assert_close(model.merge_and_unload()(x), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("flags", [{}, {"train_shared": False}, {"train_scalings": False}])
def test_save_load_round_trip_keeps_tying(tmp_path, flags):
    model = _tied(**flags)
    _randomize(model)
    x = inputs()
    out = model(x)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    shared = {"base_model.tied_A.8x8", "base_model.tied_B.8x8", "base_model.tied_A.5x8", "base_model.tied_B.5x8"}
    assert shared <= keys and not any(k.endswith((".tied_A", ".tied_B")) for k in keys)  # saved once, not per layer
    assert ("base_model.model.lin0.tied_v" in keys) == flags.get("train_scalings", True)
    loaded = PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=1e-12)
    layers = _layers(loaded)
    A0 = layers["lin0"].shared_pair("default")[0]
    assert all(layers[n].shared_pair("default")[0] is A0 for n in ("lin1", "lin2"))
    assert A0.requires_grad == flags.get("train_shared", True)
    if flags.get("train_shared", True):  # one optimizer step moves the one tied tensor, for every layer
        opt = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.1)
        loaded(x).sum().backward()
        opt.step()
        assert all(layers[n].tied_A["default"] is A0 for n in ("lin0", "lin1", "lin2"))
    merged = PeftModel.from_pretrained(build(), tmp_path).merge_and_unload()
    torch.testing.assert_close(merged(x), out, rtol=0, atol=1e-12)


def test_low_cpu_mem_usage_load_keeps_tying(tmp_path):
    model = _tied()
    _randomize(model)
    out = model(inputs())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(inputs()), out, rtol=0, atol=1e-12)
    layers = _layers(loaded)
    assert layers["lin0"].shared_pair("default")[1] is layers["lin2"].shared_pair("default")[1]


def test_frozen_shared_pair_stays_frozen():
    model = _tied(train_shared=False)
    A = model.base_model.tied_A["default"]["8x8"]
    assert not A.requires_grad and len(_layers(model)["lin0"].tied_A) == 0
    model.base_model.set_adapter("default")
    assert not A.requires_grad
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"tied_u", "tied_v"}


def test_two_adapters(tmp_path):
    model = _tied()
    model.add_adapter("other", TiedLoraConfig(r=2, target_modules=["lin1", "lin2"]))
    _randomize(model, seed=4)
    tuner, x = model.base_model, inputs()
    out_default = model(x)
    model.set_adapter("other")
    out_other = model(x)
    assert (out_other - out_default).abs().max() > 1e-3
    assert tuner.tied_A["other"]["8x8"].requires_grad and not tuner.tied_A["default"]["8x8"].requires_grad
    assert sorted(tuner.tied_A["other"].keys()) == ["8x8"]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(x), out_other, rtol=0, atol=1e-12)
    model.delete_adapter("other")
    assert "other" not in tuner.tied_A and "other" not in tuner.tied_B
    torch.testing.assert_close(model(x), out_default, rtol=0, atol=1e-12)


def test_gpt2_conv1d_merge():
    from tests.helpers.tiny_models import tiny_gpt2, token_ids

    ids = token_ids()
    model = get_peft_model(tiny_gpt2(torch.float64), TiedLoraConfig(r=2, target_modules=["c_attn", "c_proj"],
                                                                    fan_in_fan_out=True))
    _randomize(model)
    out = model(ids).logits
    assert (out - tiny_gpt2(torch.float64)(ids).logits).abs().max() > 1e-4
    torch.testing.assert_close(model.merge_and_unload()(ids).logits, out, rtol=0, atol=1e-10)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = _tied(build(dtype=torch.float32), r=4)
    x = inputs(torch.float32, batch=32)
    target = torch.randn(32, 3, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("bad", [dict(r=0), dict(bias="lora_only"), dict(lora_dropout=-0.1),
                                 dict(train_shared=False, train_scalings=False), dict(train_shared=1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="Invalid"):
        TiedLoraConfig(target_modules=STACK_TARGETS, **bad)


def test_unsupported_target_leaves_model_unchanged():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="Invalid target module"):
        get_peft_model(net, TiedLoraConfig(r=2, target_modules=["0", "1"]))
    assert type(net[0]) is torch.nn.Linear and all(p.requires_grad for p in net.parameters())
