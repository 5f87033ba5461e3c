"""Which modules a LoraConfig adapts: names, regexes, "all-linear", defaults, exclusions, layer indices."""

from __future__ import annotations

import pytest

from peft import LoraConfig, get_peft_model
from peft.tuners.target_matching import is_target, layer_index, pattern_value
from tests.helpers.lora_checks import lora_layers
from tests.helpers.tiny_models import TINY_MODELS, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_t5


def _targets(model, **config) -> set[str]:
    peft_model = get_peft_model(model, LoraConfig(**config))
    return {n.removeprefix("base_model.model.") for n, _ in lora_layers(peft_model)}


def test_list_matches_whole_name_or_dotted_suffix():
    config = LoraConfig(target_modules=["q_proj", "mlp.up_proj"])
    assert is_target(config, "model.layers.0.self_attn.q_proj")
    assert is_target(config, "q_proj")
    assert is_target(config, "model.layers.1.mlp.up_proj")
    assert not is_target(config, "model.layers.0.self_attn.qq_proj"), "no partial-name match"
    assert not is_target(config, "model.layers.0.self_attn.q_proj_extra")
    assert not is_target(config, "model.layers.0.other.up_proj")


def test_regex_must_match_the_whole_key():
    config = LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    assert is_target(config, "model.layers.1.self_attn.q_proj")
    assert not is_target(config, "model.layers.0.self_attn.q_proj")
    assert not is_target(config, "model.layers.1.self_attn.q_proj.base_layer")
    assert _targets(tiny_llama(), target_modules=r".*\.1\.self_attn\.(q|v)_proj") == {
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_all_linear_skips_the_output_layer():
    llama = _targets(tiny_llama(), target_modules="all-linear")
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert llama == expected
    gpt2 = _targets(tiny_gpt2(), target_modules="ALL-LINEAR")  # Conv1D counts as linear; spelling is case-blind
    assert gpt2 == {f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                           "mlp.c_proj")}


def test_all_linear_on_a_classifier_leaves_the_head_to_modules_to_save():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"))
    names = {n for n, _ in lora_layers(model)}
    assert not any("classifier" in n for n in names)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query" in names


@pytest.mark.parametrize(
    ("name", "expected"),
    [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}), ("bert", {"query", "value"}), ("t5", {"q", "v"})],
)
def test_default_targets_per_architecture(name, expected):
    targets = _targets(TINY_MODELS[name].build())
    assert targets and {t.rsplit(".", 1)[-1] for t in targets} == expected


def test_exclude_modules_list_and_regex():
    listed = _targets(tiny_llama(), target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    assert listed == {
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert _targets(tiny_llama(), target_modules="all-linear", exclude_modules=r".*(mlp|k_proj|o_proj).*") == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def test_layers_to_transform_with_and_without_pattern():
    assert _targets(tiny_llama(), target_modules=["q_proj"], layers_to_transform=1) == {
        "model.layers.1.self_attn.q_proj"}
    assert _targets(tiny_llama(), target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers") == {
        "model.layers.0.self_attn.q_proj"}
    t5 = _targets(tiny_t5(), target_modules=["q"], layers_to_transform=[1], layers_pattern=["block"])
    assert t5 == {"encoder.block.1.layer.0.SelfAttention.q"}, "only encoder block 1 exists with index 1"
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))


def test_layer_index_and_pattern_value():
    assert layer_index("model.layers.3.self_attn.q_proj", "layers") == 3
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q", "block") == 1
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q", ["h", "layer"]) == 0
    assert layer_index("lm_head", None) is None
    patterns = {"v_proj": 2, r"layers\.1\..*q_proj": 3}
    assert pattern_value("model.layers.0.self_attn.v_proj", patterns, 8) == 2
    assert pattern_value("model.layers.1.self_attn.q_proj", patterns, 8) == 3
    assert pattern_value("model.layers.0.self_attn.q_proj", patterns, 8) == 8
    assert pattern_value("model.layers.0.self_attn.xv_proj", patterns, 8) == 8, "a pattern matches whole names"


def test_modules_to_save_are_not_also_lora_targets():
    model = get_peft_model(TINY_MODELS["custom"].build(), LoraConfig(target_modules=["lin1", "lin2"],
                                                                       modules_to_save=["lin2"]))
    assert {n for n, _ in lora_layers(model)} == {"base_model.model.lin1"}


def test_no_match_error_lists_module_names():
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\].*matched no module.*q_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["nope"]))
