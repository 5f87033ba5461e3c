"""SoRA layers and tuner model: closed-form forward (float64), init, disable, merge / unmerge, save / load round
trip, Conv1D, several adapters, config validation."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn

from peft import PeftModel, SoraConfig, get_peft_model
from peft.tuners.sora import SoraLayer
from tests.helpers.tiny_models import tiny_gpt2, token_ids

F64 = torch.float64


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 5)
        self.lin1 = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().to(F64).eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(7, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)


@torch.no_grad()
def randomize(model: nn.Module, adapter: str = "default", seed: int = 0, zero_some: bool = True) -> None:
    """Random non-zero B and gates (some gate entries exactly zero) so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in sora_layers(model):
        for container in (layer.sora_A, layer.sora_B):
            w = container[adapter].weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.5)
        gate = layer.sora_gate[adapter]
        gate.copy_(torch.randn(gate.shape, generator=gen, dtype=gate.dtype))
        if zero_some:
            gate[::3] = 0.0


def sora_layers(model: nn.Module) -> list[tuple[str, SoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SoraLayer)]


def config(**kw) -> SoraConfig:
    return SoraConfig(**{"r": 4, "lora_alpha": 3.0, "target_modules": ["lin0", "lin1"], **kw})


def test_forward_matches_closed_form_float64():
    base = mlp()
    x = inputs()
    model = get_peft_model(mlp(), config())
    randomize(model)
    W = {k: getattr(base, k).weight for k in ("lin0", "lin1")}

    def adapted(key, h):
        layer = model.base_model.model.get_submodule(key)
        A, B, g = layer.sora_A["default"].weight, layer.sora_B["default"].weight, layer.sora_gate["default"]
        out = h @ W[key].T + (0 if layer.base_layer.bias is None else layer.base_layer.bias)
        return out + (3.0 / 4) * (((h @ A.T) * g) @ B.T)  # y = W x + b + s B (g ⊙ A x), s = alpha / r

    h = torch.relu(adapted("lin1", torch.relu(adapted("lin0", x))))
    want = base.head(h)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)


def test_init_keeps_output_and_disabled_is_base():
    x = inputs()
    base_out = mlp()(x)
    for gate_init in ("ones", "normal"):
        model = get_peft_model(mlp(), config(gate_init=gate_init))
        assert torch.equal(model(x), base_out)  # B = 0
    randomize(model)
    assert not torch.allclose(model(x), base_out)
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)
    changed = get_peft_model(mlp(), config(init_sora_weights=False))
    assert not torch.allclose(changed(x), base_out)


def test_gate_init_and_parameter_count():
    model = get_peft_model(mlp(), config(gate_init="ones"))
    for _, layer in sora_layers(model):
        assert torch.equal(layer.sora_gate["default"], torch.ones(4, dtype=F64))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * (6 + 5 + 1) + 4 * (5 + 4 + 1)  # r (m + n + 1) per adapted m x n weight


def test_merge_unmerge_and_merge_and_unload():
    x = inputs()
    base_out = mlp()(x)
    model = get_peft_model(mlp(), config())
    randomize(model)
    adapter_out = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapter_out, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), adapter_out, rtol=0, atol=1e-12)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_out, rtol=0, atol=1e-12)
    layer = model.base_model.model.lin0
    delta = layer.get_delta_weight("default")
    A, B, g = layer.sora_A["default"].weight, layer.sora_B["default"].weight, layer.sora_gate["default"]
    torch.testing.assert_close(delta, 0.75 * B @ torch.diag(g) @ A, rtol=0, atol=1e-13)
    merged = model.merge_and_unload()
    assert not sora_layers(merged)
    torch.testing.assert_close(merged(x), adapter_out, rtol=0, atol=1e-12)


def test_safe_merge_refuses_non_finite():
    model = get_peft_model(mlp(), config())
    randomize(model)
    with torch.no_grad():
        model.base_model.model.lin0.sora_gate["default"][1] = float("inf")
    before = model.base_model.model.lin0.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, before)


def test_save_load_round_trip(tmp_path):
    x = inputs()
    model = get_peft_model(mlp(), config())
    randomize(model)
    adapter_out = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SORA" and saved["r"] == 4 and saved["sparsity_lambda"] == 0.1
    from safetensors.torch import load_file

    keys = sorted(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert keys == sorted(f"base_model.model.{m}.{k}" for m in ("lin0", "lin1")
                          for k in ("sora_A.weight", "sora_B.weight", "sora_gate"))
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(loaded(x), adapter_out, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(mlp(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "sora_" in n)
    lazy = PeftModel.from_pretrained(mlp(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(lazy(x), adapter_out, rtol=0, atol=0)
    torch.testing.assert_close(loaded.merge_and_unload()(x), adapter_out, rtol=0, atol=1e-12)


def test_conv1d_gpt2_matches_merged_and_reloads(tmp_path):
    ids = token_ids()
    model = get_peft_model(tiny_gpt2(F64), SoraConfig(r=3, target_modules=["c_attn", "c_proj"],
                                                       fan_in_fan_out=True))
    randomize(model, zero_some=False)
    out = model(input_ids=ids).logits
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape  # (in, out)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_gpt2(F64), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, out, rtol=0, atol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, out, rtol=0, atol=1e-10)


def test_two_adapters_and_modules_to_save(tmp_path):
    x = inputs()
    model = get_peft_model(mlp(), config(modules_to_save=["head"]))
    model.add_adapter("other", config(r=2))
    randomize(model, "default", seed=0)
    randomize(model, "other", seed=1)
    out_default = model(x)
    model.set_adapter("other")
    out_other = model(x)
    assert not torch.allclose(out_default, out_other)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    torch.testing.assert_close(loaded(x), out_default, rtol=0, atol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(x), out_other, rtol=0, atol=0)
    model.delete_adapter("other")
    assert all("other" not in layer.sora_gate for _, layer in sora_layers(model))


def test_only_adapter_and_bias_train():
    model = get_peft_model(mlp(), config(bias="sora_only"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"base_model.model.{m}.{k}" for m in ("lin0", "lin1")
                     for k in ("sora_A.default.weight", "sora_B.default.weight", "sora_gate.default")} | {
        "base_model.model.lin0.base_layer.bias"}


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("r", 0, "r=0"), ("lora_alpha", -1.0, "lora_alpha=-1.0"), ("lora_dropout", 1.5, "lora_dropout=1.5"),
    ("sparsity_lambda", -0.1, "sparsity_lambda=-0.1"), ("gate_init", "zeros", "gate_init='zeros'"),
    ("bias", "lora_only", "bias='lora_only'"), ("init_sora_weights", "yes", "init_sora_weights='yes'"),
    ("rank_pattern", {"lin0": 0}, "rank_pattern['lin0']=0"),
])
def test_config_errors_name_the_value(field, value, shown):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {shown}: expected")):
        SoraConfig(**{field: value})
    cfg = config()
    with pytest.raises(ValueError, match=re.escape(f"Invalid {shown}")):
        setattr(cfg, field, value)  # later assignments are checked too


def test_config_edited_in_place_is_checked_before_injection():
    model, cfg = mlp(), config()
    cfg.rank_pattern["lin0"] = 0  # bypasses __setattr__
    with pytest.raises(ValueError, match=re.escape("Invalid rank_pattern['lin0']=0")):
        get_peft_model(model, cfg)
    assert not sora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_low_cpu_mem_usage_creates_on_meta():
    model = get_peft_model(mlp(), config(), low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in model.named_parameters() if "sora_" in n)


def test_half_precision_base_keeps_fp32_adapter_and_merges():
    model = get_peft_model(mlp().to(torch.bfloat16), config(init_sora_weights=False))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "sora_" in n)
    x = inputs().to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=2e-2, atol=2e-2)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), out, rtol=0, atol=2e-2)


def test_unsupported_target_refused_and_model_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 1))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="Invalid target module of type Conv2d"):
        get_peft_model(model, SoraConfig(target_modules=["0", "1"]))
    assert [type(m) for m in model.modules()] == before
