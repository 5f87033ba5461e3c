"""KronA: the Kronecker vec trick against torch.kron (float64), config validation, and the tuner invariants:
init keeps the output, adapter == merged == reloaded, disabled == base, unmerge restores the base, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft import KronAConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.krona import KronALayer
from peft.tuners.krona.kron_math import factor_shapes, kron_apply, krona_param_count, nearest_divisor


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6)).double().eval()


def config(**kw) -> KronAConfig:
    kw.setdefault("target_modules", ["0", "2"])
    return KronAConfig(**kw)


X = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


# --- math ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", [((2, 3), (4, 4)), ((1, 1), (3, 5)), ((3, 5), (1, 1)), ((4, 2), (2, 3))])
def test_kron_apply_matches_materialised_kron(a, b):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(*a, dtype=torch.float64, generator=g), torch.randn(*b, dtype=torch.float64, generator=g)
    x = torch.randn(2, 3, a[1] * b[1], dtype=torch.float64, generator=g)
    expected = x @ torch.kron(A, B).T
    torch.testing.assert_close(kron_apply(x, A, B), expected, rtol=1e-12, atol=1e-12)


def test_factor_shapes_rules():
    assert factor_shapes(8, 12, None) == ((2, 3), (4, 4))  # nearest sqrt(8) ~ 2.83 among {1,2,4,8}: 2
    assert nearest_divisor(12, 12 ** 0.5) == 3
    assert factor_shapes(16, 16, 4) == ((4, 4), (4, 4))
    assert factor_shapes(6, 8, [3, 2]) == ((3, 2), (2, 4))
    assert krona_param_count(16, 16, 4) == 32
    with pytest.raises(ValueError, match=r"krona_dim=5 .*a1 dividing 16"):
        factor_shapes(16, 16, 5)


@pytest.mark.parametrize("field,value", [("krona_dim", 0), ("krona_dim", [2]), ("krona_dim", True),
                                         ("krona_dropout", 1.5), ("bias", "lora_only"), ("init_weights", "x"),
                                         ("krona_dim_pattern", {"q": -1})])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        config(**{field: value})


def test_config_json_round_trip(tmp_path):
    cfg = config(krona_dim=[2, 3], krona_dim_pattern={"2": 2}, krona_scale=2.0)
    cfg.save_pretrained(tmp_path)
    again = KronAConfig.from_pretrained(tmp_path)
    assert again.krona_dim == [2, 3] and again.krona_dim_pattern == {"2": 2} and again.krona_scale == 2.0


# --- tuner invariants ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, "a_zero"])
def test_init_keeps_output(init):
    base = mlp()
    expected = base(X)
    model = get_peft_model(mlp(), config(init_weights=init))
    torch.testing.assert_close(model(X), expected, rtol=0, atol=0)


def test_forward_is_closed_form_and_merge_unmerge():
    base = mlp()
    model = get_peft_model(mlp(), config(init_weights=False, krona_scale=0.5))
    layer = model.base_model.model[0]
    A, B = layer.krona_A["default"], layer.krona_B["default"]
    h = base[0](X) + 0.5 * X @ torch.kron(A, B).T
    torch.testing.assert_close(layer(X), h, rtol=1e-12, atol=1e-12)
    out = model(X)
    assert not torch.allclose(out, base(X))
    torch.testing.assert_close(layer.get_delta_weight("default"), 0.5 * torch.kron(A, B))
    with model.disable_adapter():
        torch.testing.assert_close(model(X), base(X), rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(model(X), out, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model[0].base_layer.weight, base[0].weight, rtol=0, atol=1e-15)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, KronALayer) for m in merged.modules())
    torch.testing.assert_close(merged(X), out, rtol=1e-12, atol=1e-12)


def test_save_load_round_trip(tmp_path):
    model = get_peft_model(mlp(), config(init_weights=False, krona_dim_pattern={"2": [3, 2]}))
    out = model(X)
    keys = set(get_peft_model_state_dict(model))
    assert keys == {f"base_model.model.{i}.krona_{f}" for i in (0, 2) for f in "AB"}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    assert loaded.base_model.model[2].krona_A["default"].shape == (3, 2)
    torch.testing.assert_close(loaded(X), out, rtol=1e-13, atol=1e-13)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "krona_" in n)
    torch.testing.assert_close(loaded.merge_and_unload()(X), out, rtol=1e-12, atol=1e-12)


def test_indivisible_dim_names_module_and_leaves_model_unchanged():
    base = mlp()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"Invalid krona_dim=\[4, 5\] for module '0'"):
        get_peft_model(base, config(krona_dim=[4, 5]))
    assert isinstance(base[0], nn.Linear) and not isinstance(base[0], KronALayer)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_trainable_parameters_and_training_reduces_loss():
    torch.manual_seed(0)
    model = get_peft_model(mlp(), config(krona_dim=2))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == (4 + 4 * 6) + (4 + 3 * 4)  # a1*a2 + (m/a1)*(n/a2) per layer
    target = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = ((model(X) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_gpt2_conv1d_merge_matches_forward():
    from tests.helpers.tiny_models import tiny_gpt2

    model = get_peft_model(tiny_gpt2(torch.float64), KronAConfig(target_modules=["c_attn", "c_proj"],
                                                                 init_weights=False, krona_scale=0.1))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids).logits
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.get_delta_weight("default").shape == layer.base_layer.weight.shape
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-10, atol=1e-10)


def test_two_adapters_and_bf16_base():
    model = get_peft_model(mlp(), config(init_weights=False))
    model.add_adapter("other", config(init_weights=False, krona_dim=2))
    model.set_adapter("other")
    assert model.base_model.model[0].krona_A["other"].shape == (2, 2)
    base16 = mlp().to(torch.bfloat16)
    m16 = get_peft_model(base16, config())
    assert m16.base_model.model[0].krona_A["default"].dtype == torch.float32
    assert m16(X.to(torch.bfloat16)).dtype == torch.bfloat16


def test_low_cpu_mem_usage_load_and_second_adapter(tmp_path):
    model = get_peft_model(mlp(), config(init_weights=False)).eval()
    out = model(X)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(X), out, rtol=1e-13, atol=1e-13)
    loaded.load_adapter(tmp_path, "again", is_trainable=True)
    loaded.set_adapter("again")
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".again" in n and "krona_" in n for n in trainable)
    torch.testing.assert_close(loaded(X), out, rtol=1e-13, atol=1e-13)
    loaded.delete_adapter("again")
    assert list(loaded.peft_config) == ["default"]


def test_rescale_adapter_scale():
    from peft.helpers import rescale_adapter_scale

    base = mlp()
    model = get_peft_model(mlp(), config(init_weights=False)).eval()
    out = model(X)
    with rescale_adapter_scale(model, 0.0):
        torch.testing.assert_close(model(X), base(X), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(model(X), out, rtol=0, atol=0)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv2d_closed_form_merge_and_reload(tmp_path, padding_mode):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2, padding_mode=padding_mode)).double().eval()

    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    base = net()
    model = get_peft_model(net(), KronAConfig(target_modules=["0"], krona_dim=[3, 4], init_weights=False,
                                              krona_scale=0.3)).eval()
    layer = model.base_model.model[0]
    A, B = layer.krona_A["default"], layer.krona_B["default"]
    assert B.shape == (2, 9)  # (6 / 3, 4 * 3 * 3 / 4)
    kernel = base[0].weight + 0.3 * torch.kron(A, B).reshape(6, 4, 3, 3)
    expected = base[0]._conv_forward(x, kernel, base[0].bias)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(net(), tmp_path)
    torch.testing.assert_close(loaded(x), out, rtol=1e-13, atol=1e-13)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-14)


def test_grouped_conv_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        get_peft_model(model, KronAConfig(target_modules=["0"]))
    assert isinstance(model[0], nn.Conv2d) and not isinstance(model[0], KronALayer)
