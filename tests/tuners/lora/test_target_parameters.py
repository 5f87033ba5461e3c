"""LoRA on bare parameters (`LoraConfig(target_parameters=[...])`): fused 3-D MoE experts of tiny transformers 5
models (Qwen3-MoE, GPT-OSS's transposed stacks, Mixtral) and 2-D parameters of plain modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.param_wrapper import ParamWrapper, expert_factors, stack_factors, stacked_delta
from peft.utils.save_and_load import get_peft_model_state_dict

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATOL = 1e-5


def tiny_moe(kind: str = "qwen3_moe", seed: int = 0) -> nn.Module:
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=8, num_experts=4, **common)
    elif kind == "gpt_oss":
        config = GptOssConfig(intermediate_size=8, num_local_experts=4,
                              layer_types=["sliding_attention", "full_attention"], **common)
    else:
        config = MixtralConfig(intermediate_size=8, num_local_experts=4, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # transformers leaves some expert stacks empty/untouched at from_config: fill them
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def lora(model, seed: int = 3, **kwargs):
    torch.manual_seed(seed)
    config = dict(target_modules=[], target_parameters=EXPERTS, r=2, lora_alpha=4, init_lora_weights=False)
    config.update(kwargs)
    return get_peft_model(model, LoraConfig(**config))


# --- the math, float64 ---------------------------------------------------------------------------------------------
def test_expert_layout_matches_hand_built_stack():
    E, r, m, n = 3, 2, 5, 4
    A_e = torch.randn(E, r, n, dtype=torch.float64)
    B_e = torch.randn(E, m, r, dtype=torch.float64)
    A, B = stack_factors(A_e, B_e)
    assert A.shape == (E * r, n) and B.shape == (m, r * E)
    for e in range(E):  # A: contiguous row blocks; B: interleaved columns e, e + E, ...
        assert torch.equal(A[e * r:(e + 1) * r], A_e[e])
        assert torch.equal(B[:, e::E], B_e[e])
    back_A, back_B = expert_factors(A, B, E)
    assert torch.equal(back_A, A_e) and torch.equal(back_B, B_e)
    delta = stacked_delta(A, B, 0.5, torch.Size((E, m, n)), transposed=False)
    expected = torch.stack([0.5 * B_e[e] @ A_e[e] for e in range(E)])
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-12)
    delta_t = stacked_delta(A, B, 0.5, torch.Size((E, n, m)), transposed=True)
    torch.testing.assert_close(delta_t, expected.transpose(1, 2), rtol=0, atol=1e-12)
    flat = stacked_delta(A_e[0], B_e[0], 2.0, torch.Size((m, n)), transposed=False)
    torch.testing.assert_close(flat, 2.0 * B_e[0] @ A_e[0], rtol=0, atol=1e-12)


# --- invariants on real MoE models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_adapter_merged_unmerged_disabled(kind):
    base = tiny_moe(kind)
    x = ids()
    ref = logits(base, x)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = lora(copy.deepcopy(base))
    out = logits(model, x)
    assert (out - ref).abs().max() > 1e-3  # the adapter changes the output
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=ATOL)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), out, rtol=0, atol=ATOL)
    model.unmerge_adapter()
    for key, value in model.base_model.model.state_dict().items():
        if "lora_" not in key:
            plain = key.replace("base_layer.", "")
            torch.testing.assert_close(value, before[plain], rtol=0, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), out, rtol=0, atol=ATOL)


def test_merge_adds_each_experts_own_update():
    model = lora(tiny_moe(), target_parameters=["mlp.experts.down_proj"])
    wrapper = model.base_model.model.model.layers[0].mlp.experts
    W = wrapper.get_param().detach().clone()  # (E, out, in)
    A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    E, s = W.shape[0], wrapper.scaling["default"]
    wrapper.merge()
    for e in range(E):
        expected = W[e] + s * B[:, e::E].double() @ A[e * 2:(e + 1) * 2].double()
        torch.testing.assert_close(wrapper.get_param()[e].double(), expected, rtol=0, atol=1e-6)


def test_keys_shapes_and_reload(tmp_path):
    base = tiny_moe()
    x = ids()
    model = lora(copy.deepcopy(base))
    out = logits(model, x)
    state = get_peft_model_state_dict(model)
    prefix = "base_model.model.model.layers.0.mlp.experts."
    # gate_up_proj (registered first) is the inner wrapper, down_proj the outer one (upstream's keys)
    assert state[prefix + "base_layer.lora_A.weight"].shape == (4 * 2, 16)  # (E r, hidden)
    assert state[prefix + "base_layer.lora_B.weight"].shape == (2 * 8, 2 * 4)  # (2 inter, r E)
    assert state[prefix + "lora_A.weight"].shape == (4 * 2, 8)
    assert state[prefix + "lora_B.weight"].shape == (16, 2 * 4)
    assert len(state) == 2 * 2 * 2
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].target_parameters == EXPERTS
    torch.testing.assert_close(logits(loaded, x), out, rtol=0, atol=ATOL)


def test_training_step_moves_only_the_factors():
    model = lora(tiny_moe(), init_lora_weights=True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = ids()
    for _ in range(2):
        optim.zero_grad()
        model(x, labels=x).loss.backward()
        optim.step()
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())  # removed after each forward


def test_second_adapter_reuses_wrappers_and_switches():
    base = tiny_moe()
    x = ids()
    model = lora(copy.deepcopy(base))
    first = logits(model, x)
    wrappers = sum(isinstance(m, ParamWrapper) for m in model.modules())
    torch.manual_seed(9)
    model.add_adapter("other", LoraConfig(target_modules=[], target_parameters=EXPERTS, r=3, init_lora_weights=False))
    assert sum(isinstance(m, ParamWrapper) for m in model.modules()) == wrappers
    torch.testing.assert_close(logits(model, x), first, rtol=0, atol=ATOL)
    model.set_adapter("other")
    second = logits(model, x)
    assert (second - first).abs().max() > 1e-3
    model.delete_adapter("default")
    torch.testing.assert_close(logits(model, x), second, rtol=0, atol=ATOL)
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            assert set(module.lora_A) == {"other"}


def test_different_target_set_refused_and_model_unchanged():
    model = lora(tiny_moe())
    names = sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="same set of parameters"):
        model.add_adapter("other", LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]))
    assert "other" not in model.peft_config
    assert sorted(n for n, _ in model.named_parameters()) == names


@pytest.mark.parametrize("targets, needle", [
    (["mlp.experts.gate_proj"], "mlp.experts.gate_proj"),
    (["mlp.experts.down_proj", "experts.nope"], "experts.nope"),
])
def test_bad_parameter_names_raise_and_leave_model(targets, needle):
    base = tiny_moe()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=needle):
        get_peft_model(base, LoraConfig(target_modules=[], target_parameters=targets))
    assert not any(isinstance(m, ParamWrapper) for m in base.modules())
    assert set(base.state_dict()) == set(before)


def test_refused_settings():
    base = tiny_moe()
    with pytest.raises(ValueError, match="lora_dropout"):
        lora(base, lora_dropout=0.1)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lora(base, fan_in_fan_out=True)
    if "use_dora" in LoraConfig.__dataclass_fields__:
        with pytest.raises(ValueError, match="use_dora"):
            lora(base, use_dora=True)
    assert not any(isinstance(m, ParamWrapper) for m in base.modules())  # every refusal left the model as it was
    with pytest.raises(ValueError, match="parameter name strings|single entry"):
        LoraConfig(target_parameters="mlp.experts.down_proj")

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.param = nn.Parameter(torch.zeros(4, 4))
            self.lin = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="top-level module"):
        get_peft_model(Top(), LoraConfig(target_parameters=["param"]))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(Top(), LoraConfig(target_modules=["lin"], target_parameters=["lin.weight"]))


def test_2d_parameter_equals_linear_lora():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    by_module = get_peft_model(copy.deepcopy(net), LoraConfig(target_modules=["0"], init_lora_weights=False))
    by_param = get_peft_model(copy.deepcopy(net), LoraConfig(target_parameters=["0.weight"], init_lora_weights=False))
    src, dst = by_module.base_model.model[0], by_param.base_model.model[0]
    assert isinstance(dst, ParamWrapper) and "parameter_name='weight'" in repr(dst)
    dst.lora_A["default"].weight.data.copy_(src.lora_A["default"].weight)
    dst.lora_B["default"].weight.data.copy_(src.lora_B["default"].weight)
    torch.testing.assert_close(by_param(x), by_module(x), rtol=0, atol=1e-6)


def test_user_parametrization_kept():
    lin = nn.Linear(2, 2, bias=False)
    nn.init.ones_(lin.weight)
    net = nn.Sequential(lin)
    nn.utils.parametrize.register_parametrization(lin, "weight", _PlusOne())
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=6, target_parameters=["0.weight"], init_lora_weights=False))
    wrapper = model.base_model.model[0]
    nn.init.ones_(wrapper.lora_A["default"].weight)
    nn.init.ones_(wrapper.lora_B["default"].weight)
    x = torch.ones(1, 2)
    assert torch.all(model(x) == 16)  # (1 + 1 + 3 * 2) * 2
    assert torch.all(model(x) == 16)
    with pytest.raises(ValueError, match="parametrized"):
        model.merge_adapter()
    assert torch.all(model.unload()(x) == 4)


class _PlusOne(nn.Module):
    def forward(self, W):
        return W + 1


def test_weight_conversion_accepts_target_parameter_keys():
    from peft.utils.transformers_weight_conversion import convert_adapter_state_dict

    base = tiny_moe()
    state = get_peft_model_state_dict(lora(copy.deepcopy(base)))
    converted = convert_adapter_state_dict(base, state)
    assert sorted(converted) == sorted(state)


def test_two_adapters_load_in_any_order(tmp_path):
    base = tiny_moe()
    x = ids()
    model = lora(copy.deepcopy(base))
    torch.manual_seed(11)
    model.add_adapter("other", LoraConfig(target_modules=[], target_parameters=EXPERTS, r=2, init_lora_weights=False))
    outputs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outputs[name] = logits(model, x)
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "other", adapter_name="other")
    result = loaded.load_adapter(tmp_path, adapter_name="default")
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("default", "other"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, x), outputs[name], rtol=0, atol=ATOL)


def test_transformers_load_adapter(tmp_path):
    """transformers' own adapter API (`model.load_adapter`) loads a target_parameters adapter of this package."""
    base = tiny_moe()
    x = ids()
    model = lora(copy.deepcopy(base))
    out = logits(model, x)
    model.save_pretrained(tmp_path)
    plain = copy.deepcopy(base)
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(plain, x), out, rtol=0, atol=ATOL)
