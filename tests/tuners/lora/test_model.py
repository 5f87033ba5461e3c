"""The (model, config) matrix through the shared LoRA invariants, in float64 so equalities are tight.

Invariants: a fresh adapter leaves the model unchanged (init True / "gaussian"); every LoRA layer computes
`x W^T + b + s x A^T B^T`; adapter output == merged == unmerged (W restored) == `merge_and_unload` == reloaded
from disk; `disable_adapter()` gives the base output; only adapter (+ `modules_to_save`, + chosen biases) train.
"""

from __future__ import annotations

import pytest
import torch

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from tests.helpers.lora_checks import (
    assert_layers_match_closed_form,
    base_weights,
    lora_layers,
    randomize_adapter,
    trainable_names,
)
from tests.helpers.tiny_models import TINY_MODELS, model_output

F64 = torch.float64

CASES = {
    "llama-default-targets": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8)),
    "llama-all-linear-rslora-patterns": (
        "llama",
        dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
             rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}),
    ),
    "gpt2-conv1d-bias-lora-only": (
        "gpt2", dict(task_type="CAUSAL_LM", r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], bias="lora_only"),
    ),
    "bert-seq-cls-bias-all": ("bert", dict(task_type="SEQ_CLS", r=2, lora_alpha=4, bias="all")),
    "t5-layers-to-transform": (
        "t5", dict(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=2, target_modules=["q", "v"], layers_to_transform=[1],
                   layers_pattern="block"),
    ),
    "custom-emb-conv-linear-mts": (
        "custom", dict(r=3, lora_alpha=6, target_modules=["emb", "conv", "lin1"], modules_to_save=["lin2"]),
    ),
    "custom-gaussian-regex": (
        "custom", dict(r=2, lora_alpha=1, target_modules=r"(conv|lin\d)", init_lora_weights="gaussian"),
    ),
}


def _setup(case: str, randomize: bool = True):
    """(spec, base output, peft model, inputs) for `case`, with random non-zero adapter weights."""
    model_name, kwargs = CASES[case]
    spec = TINY_MODELS[model_name]
    base = spec.build(dtype=F64)
    inputs = spec.inputs()
    with torch.no_grad():
        y_base = model_output(base(**inputs))
    model = get_peft_model(base, LoraConfig(**kwargs))
    model.eval()
    if randomize:
        randomize_adapter(model, "default", seed=1)
    return spec, y_base, model, inputs


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**inputs))


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_adapter_is_identity_and_disabled_is_base(case):
    _, y_base, model, inputs = _setup(case, randomize=False)
    assert lora_layers(model), "no LoRA layer injected"
    torch.testing.assert_close(_out(model, inputs), y_base, atol=0, rtol=0)
    randomize_adapter(model, "default", seed=1)
    y_adapter = _out(model, inputs)
    assert (y_adapter - y_base).abs().max() > 1e-3, "a non-zero adapter must change the output"
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, inputs), y_base, atol=0, rtol=0)
    torch.testing.assert_close(_out(model, inputs), y_adapter, atol=0, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_closed_form(case):
    _, _, model, inputs = _setup(case)
    assert assert_layers_match_closed_form(model, inputs) == len(lora_layers(model))


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_and_merge_and_unload(case):
    _, _, model, inputs = _setup(case)
    y_adapter = _out(model, inputs)
    weights = base_weights(model)
    model.merge_adapter()
    assert all(layer.merged for _, layer in lora_layers(model))
    changed = [n for n, layer in lora_layers(model) if not torch.equal(layer.get_base_layer().weight, weights[n])]
    assert changed, "merging a non-zero adapter must change the base weights"
    _close(_out(model, inputs), y_adapter)
    model.unmerge_adapter()
    assert not any(layer.merged for _, layer in lora_layers(model))
    for name, layer in lora_layers(model):
        _close(layer.get_base_layer().weight, weights[name], tol=1e-13)
    _close(_out(model, inputs), y_adapter)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert not any("lora_" in k or "modules_to_save" in k for k in merged.state_dict())
    _close(model_output(merged(**inputs)), y_adapter)


@pytest.mark.parametrize("case", list(CASES))
def test_save_and_load_reproduces_output(case, tmp_path):
    spec, _, model, inputs = _setup(case)
    bias = model.peft_config["default"].bias
    if bias != "none":  # a trained bias is part of the adapter: perturb the trainable ones
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") and param.requires_grad:
                    param.add_(0.5)
    y_adapter = _out(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(spec.build(dtype=F64), tmp_path)
    assert type(loaded) is type(model)
    torch.testing.assert_close(_out(loaded, inputs), y_adapter, atol=0, rtol=0)
    assert not trainable_names(loaded), "from_pretrained without is_trainable must freeze everything"
    assert not loaded.training
    trainable = PeftModel.from_pretrained(spec.build(dtype=F64), tmp_path, is_trainable=True)
    assert trainable_names(trainable) == trainable_names(model)


@pytest.mark.parametrize("case", list(CASES))
def test_only_adapter_modules_to_save_and_chosen_bias_train(case):
    _, _, model, inputs = _setup(case)
    config = model.peft_config["default"]
    names = trainable_names(model)
    assert names, "nothing trainable"
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert lora <= names, "every LoRA factor of the active adapter trains"
    mts = {n for n in names if ".modules_to_save.default." in n}
    biases = {n for n in names - lora - mts if n.endswith("bias")}
    assert names == lora | mts | biases, f"unexpected trainable params {sorted(names - lora - mts - biases)}"
    assert not any("original_module" in n for n in names)
    lora_bias_names = {f"{n}.base_layer.bias" for n, layer in lora_layers(model)
                       if getattr(layer.get_base_layer(), "bias", None) is not None}
    expected_biases = {
        "none": set(),
        "lora_only": lora_bias_names,
        "all": {n for n, _ in model.named_parameters() if n.endswith("bias") and "original_module" not in n
                and ".lora_" not in n and ".modules_to_save." not in n},
    }[config.bias]
    assert biases == expected_biases
    if config.bias != "none":
        assert biases
    head = TINY_MODELS[CASES[case][0]].head
    wants_mts = bool(config.modules_to_save) or head is not None
    assert bool(mts) == wants_mts
    # Gradients reach exactly the trainable parameters.
    model_output(model(**inputs)).double().pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= names
    assert lora & with_grad, "no gradient reached the LoRA factors"


# --- scaling ----------------------------------------------------------------------------------------------------
def test_scaling_rslora_and_rank_alpha_patterns():
    """s = alpha / r, rsLoRA s = alpha / sqrt(r); rank_pattern / alpha_pattern override r / alpha per module."""
    _, _, model, _ = _setup("llama-all-linear-rslora-patterns", randomize=False)
    layers = dict(lora_layers(model))
    seen = set()
    for name, layer in layers.items():
        r = 2 if name.endswith("v_proj") else 4
        alpha = 3 if name.endswith("layers.1.self_attn.q_proj") else 8
        assert layer.r["default"] == r and layer.lora_alpha["default"] == alpha, name
        assert layer.scaling["default"] == pytest.approx(alpha / r**0.5, rel=1e-12), name
        assert layer.lora_A["default"].weight.shape[0] == r and layer.lora_B["default"].weight.shape[1] == r
        seen.add((r, alpha))
    assert seen == {(4, 8), (2, 8), (4, 3)}
    assert "base_model.model.lm_head" not in layers, "all-linear must skip the output layer"
    plain = get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert {layer.scaling["default"] for _, layer in lora_layers(plain)} == {2.0}


def test_rslora_scale_changes_output_by_sqrt_r():
    """With equal A, B the rsLoRA update is sqrt(r) times the plain one (alpha / sqrt(r) vs alpha / r)."""
    spec, r = TINY_MODELS["custom"], 4
    outs = {}
    for rs in (False, True):
        model = get_peft_model(spec.build(dtype=F64), LoraConfig(r=r, lora_alpha=2, target_modules=["lin2"],
                                                                  use_rslora=rs))
        randomize_adapter(model, seed=3)
        with model.disable_adapter():
            base = _out(model, spec.inputs())
        outs[rs] = _out(model, spec.inputs()) - base
    _close(outs[True], outs[False] * r**0.5)


# --- several adapters -------------------------------------------------------------------------------------------
def _two_adapters(other_head: bool = True):
    """Adapters "default" and "other"; both train their own copy of `lin2` unless `other_head=False`."""
    spec = TINY_MODELS["custom"]
    model = get_peft_model(spec.build(dtype=F64), LoraConfig(r=2, target_modules=["lin1", "conv"],
                                                            modules_to_save=["lin2"]))
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["lin1", "emb"],
                                          modules_to_save=["lin2"] if other_head else None))
    randomize_adapter(model, "default", seed=1)
    randomize_adapter(model, "other", seed=2)
    return spec, model.eval()


def test_add_and_switch_adapters():
    spec, model = _two_adapters()
    inputs = spec.inputs()
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert not any(".other." in n for n in trainable_names(model)), "a new adapter is not active, so frozen"
    y_default = _out(model, inputs)
    assert assert_layers_match_closed_form(model, inputs) == 3
    model.set_adapter("other")
    assert model.active_adapter == "other"
    names = trainable_names(model)
    assert names and all(".other" in n for n in names)
    y_other = _out(model, inputs)
    assert (y_other - y_default).abs().max() > 1e-3
    assert_layers_match_closed_form(model, inputs)
    model.set_adapter("default")
    torch.testing.assert_close(_out(model, inputs), y_default, atol=0, rtol=0)
    before = trainable_names(model)
    with pytest.raises(ValueError, match=r"\['default', 'other'\].*only one"):  # two copies of lin2: which one?
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"] and trainable_names(model) == before
    torch.testing.assert_close(_out(model, inputs), y_default, atol=0, rtol=0)
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")


def test_several_active_adapters_add_up_and_use_the_one_head_copy():
    spec, model = _two_adapters(other_head=False)
    inputs = spec.inputs()
    model.base_model.set_adapter(["other", "default"])  # both at once: the updates add up
    assert model.active_adapters == ["other", "default"]
    assert assert_layers_match_closed_form(model, inputs) == 3  # emb, conv, lin1
    head = model.get_base_model().lin2
    assert head.active_adapter == "default"  # the only adapter with a copy of lin2, though not the first name
    head_params = {n.removeprefix("base_model.model.") for n in trainable_names(model) if "lin2" in n}
    assert head_params == {"lin2.modules_to_save.default.weight", "lin2.modules_to_save.default.bias"}
    model.delete_adapter("default")  # the other active adapter stays active
    assert model.active_adapters == ["other"] and model.get_base_model().lin1.active_adapters == ["other"]


def test_delete_adapter_removes_its_weights_and_keeps_the_other():
    spec, model = _two_adapters()
    inputs = spec.inputs()
    y_default = _out(model, inputs)
    model.set_adapter("other")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".other" in k for k in model.state_dict())
    torch.testing.assert_close(_out(model, inputs), y_default, atol=0, rtol=0)
    assert trainable_names(model) and all(".default" in n for n in trainable_names(model))
    with pytest.raises(ValueError, match="other"):
        model.delete_adapter("other")


def test_merge_two_adapters_then_unmerge_restores_weights():
    spec, model = _two_adapters(other_head=False)
    inputs = spec.inputs()
    model.base_model.set_adapter(["default", "other"])
    y_both = _out(model, inputs)
    weights = base_weights(model)
    model.merge_adapter()
    _close(_out(model, inputs), y_both)
    model.unmerge_adapter()
    for name, layer in lora_layers(model):
        _close(layer.get_base_layer().weight, weights[name], tol=1e-13)


def test_save_selected_adapters_in_subfolders(tmp_path):
    spec, model = _two_adapters()
    inputs = spec.inputs()
    model.set_adapter("other")
    y_other = _out(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(spec.build(dtype=F64), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.set_adapter("other")
    torch.testing.assert_close(_out(loaded, inputs), y_other, atol=0, rtol=0)


# --- layer-type details -----------------------------------------------------------------------------------------
def test_conv1d_forces_fan_in_fan_out_and_linear_refuses_it():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        gpt2 = get_peft_model(TINY_MODELS["gpt2"].build(), LoraConfig(target_modules=["c_attn"]))
    assert gpt2.peft_config["default"].fan_in_fan_out is True
    assert all(layer.fan_in_fan_out for _, layer in lora_layers(gpt2))
    layer = dict(lora_layers(gpt2))["base_model.model.transformer.h.0.attn.c_attn"]
    assert layer.in_features == 16 and layer.out_features == 48
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape == (16, 48)
    with pytest.warns(UserWarning, match="nn.Linear"):
        llama = get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(target_modules=["q_proj"],
                                                                        fan_in_fan_out=True))
    assert not any(layer.fan_in_fan_out for _, layer in lora_layers(llama))


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_lora_weights_modes(init):
    spec = TINY_MODELS["custom"]
    base = spec.build(dtype=F64)
    y_base = _out(base, spec.inputs())
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["emb", "conv", "lin1"], init_lora_weights=init))
    y = _out(model, spec.inputs())
    if init is False:
        assert (y - y_base).abs().max() > 1e-3, "init_lora_weights=False starts with a non-zero update"
    else:
        torch.testing.assert_close(y, y_base, atol=0, rtol=0)
    for _, layer in lora_layers(model):
        delta = layer.get_delta_weight("default")
        assert (delta.abs().max() > 0) == (init is False)


def test_plain_module_without_config_and_missing_default_targets():
    spec = TINY_MODELS["custom"]
    model = get_peft_model(spec.build(), LoraConfig(target_modules=["lin1"]))
    assert type(model) is PeftModel and model.get_base_model().__class__.__name__ == "TinyNet"
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(spec.build(), LoraConfig())


def test_tied_weights_warn():
    """GPT-2's `wte` is tied to `lm_head`: adapting it warns, since merging would change `lm_head` as well."""
    with pytest.warns(UserWarning, match=r"'transformer.wte' shares its weight with \['lm_head'\]"):
        get_peft_model(TINY_MODELS["gpt2"].build(), LoraConfig(target_modules=["wte"]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(target_modules=["embed_tokens", "q_proj"]))


@pytest.mark.parametrize("exclude,expected", [
    (["q_proj"], {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}),
    (r".*layers\.0\..*", {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
])
def test_exclude_modules_as_names_or_regex(exclude, expected):
    config = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=exclude)
    model = get_peft_model(TINY_MODELS["llama"].build(), config)
    assert {name for name, _ in model.base_model.tuner_layers()} == expected
