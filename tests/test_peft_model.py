"""PeftModel's API surface: task classes, attribute layout, parameter counts, adapter state, registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft
from peft import (
    LoraConfig,
    LoraModel,
    PeftConfig,
    PeftMixedModel,
    PeftModel,
    get_peft_model,
    inject_adapter_in_model,
    register_peft_method,
)
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from tests.helpers.lora_checks import lora_layers, randomize_adapter, trainable_names
from tests.helpers.tiny_models import TINY_MODELS, model_output, tiny_bert_classifier, tiny_llama

TASK_CLASSES = {
    "SEQ_CLS": peft.PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": peft.PeftModelForSeq2SeqLM,
    "CAUSAL_LM": peft.PeftModelForCausalLM,
    "TOKEN_CLS": peft.PeftModelForTokenClassification,
    "QUESTION_ANS": peft.PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": peft.PeftModelForFeatureExtraction,
    None: PeftModel,
}


@pytest.mark.parametrize("task", list(TASK_CLASSES))
def test_get_peft_model_picks_the_task_class(task):
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(task_type=task, target_modules=["query"]))
    assert type(model) is TASK_CLASSES[task]
    heads = {n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    wants_head = task in ("SEQ_CLS", "TOKEN_CLS")  # BERT's head is `classifier`; QA's `qa_outputs` is absent
    assert heads == ({"base_model.model.classifier"} if wants_head else set())
    if wants_head:
        assert {"base_model.model.classifier.modules_to_save.default.weight"} <= trainable_names(model)
        assert model.peft_config["default"].modules_to_save == ["classifier", "score"]


def test_upstream_attribute_layout():
    base = tiny_llama()
    q_proj = base.model.layers[0].self_attn.q_proj
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(model.base_model, LoraModel) and isinstance(model.base_model, BaseTuner)
    assert model.base_model.model is base and model.get_base_model() is base
    assert model.config is base.config, "attributes fall through to the wrapped model"
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and isinstance(layer, BaseTunerLayer)
    assert layer.base_layer is q_proj and layer.get_base_layer() is q_proj, "the base layer is wrapped, not copied"
    assert isinstance(layer.lora_A, nn.ModuleDict) and isinstance(layer.lora_A["default"], nn.Linear)
    assert layer.lora_A["default"].weight.shape == (4, 16) and layer.lora_B["default"].weight.shape == (16, 4)
    assert layer.r == {"default": 4} and layer.scaling == {"default": 2.0}
    assert layer.merged is False and layer.disable_adapters is False and layer.active_adapters == ["default"]
    names = dict(model.named_parameters())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert model.peft_config is model.base_model.peft_config and set(model.peft_config) == {"default"}
    assert model.peft_config["default"].is_prompt_learning is False


def test_parameter_counts():
    base = tiny_llama()
    total_base = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # q_proj: 16 -> 16, v_proj: 16 -> 8 (one KV head of 8), 2 layers; LoRA adds r * (in + out) each.
    expected = 2 * (4 * (16 + 16) + 4 * (16 + 8))
    assert model.get_nb_trainable_parameters() == (expected, total_base + expected)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_print_trainable_parameters(capsys):
    model = get_peft_model(TINY_MODELS["custom"].build(), LoraConfig(r=2, target_modules=["lin2"]))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (16 + 5)
    out = capsys.readouterr().out
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in out


def test_active_adapter_properties():
    model = get_peft_model(TINY_MODELS["custom"].build(), LoraConfig(target_modules=["lin1"]), adapter_name="first")
    assert model.active_adapter == "first" and model.active_adapters == ["first"]
    model.add_adapter("second", LoraConfig(target_modules=["lin2"]))
    assert model.active_adapter == "first"
    model.set_adapter("second")
    assert model.active_adapter == "second" and model.active_adapters == ["second"]
    assert all(layer.active_adapters == ["second"] for _, layer in lora_layers(model))


def test_disable_adapter_restores_state_even_on_error():
    spec = TINY_MODELS["custom"]
    model = get_peft_model(spec.build(), LoraConfig(target_modules=["lin1", "emb"], modules_to_save=["lin2"]))
    randomize_adapter(model, seed=1)
    before = trainable_names(model)
    y = model_output(model(**spec.inputs()))
    with pytest.raises(RuntimeError, match="inside"):
        with model.disable_adapter():
            assert all(layer.disable_adapters for _, layer in lora_layers(model))
            raise RuntimeError("inside")
    assert not any(layer.disable_adapters for _, layer in lora_layers(model))
    assert trainable_names(model) == before
    torch.testing.assert_close(model_output(model(**spec.inputs())), y, atol=0, rtol=0)


def test_disable_adapter_keeps_frozen_adapters_frozen(tmp_path):
    spec = TINY_MODELS["custom"]
    model = get_peft_model(spec.build(), LoraConfig(target_modules=["lin1"], modules_to_save=["lin2"]))
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(spec.build(), tmp_path)
    with frozen.disable_adapter():
        pass
    assert not trainable_names(frozen), "an inference-mode adapter must not become trainable"
    model.get_base_model().lin1.lora_A["default"].weight.requires_grad_(False)  # user choice: train B only
    before = trainable_names(model)
    with model.disable_adapter():
        pass
    assert trainable_names(model) == before


def test_unload_gives_back_the_original_layers_and_the_trained_modules_to_save_copy():
    """As upstream: LoRA layers go without merging; a `modules_to_save` module becomes the active adapter's copy."""
    spec = TINY_MODELS["custom"]
    base = spec.build()
    originals = dict(base.named_children())
    model = get_peft_model(base, LoraConfig(target_modules=["lin1", "conv"], modules_to_save=["lin2"]))
    randomize_adapter(model, seed=1)
    head = model.get_base_model().lin2.modules_to_save["default"]
    assert not torch.equal(head.weight, originals["lin2"].weight)
    reference = spec.build()
    reference.lin2.load_state_dict(head.state_dict())
    plain = model.unload()
    assert plain is base and plain.lin2 is head
    others = {k: m for k, m in originals.items() if k != "lin2"}
    assert {k: m for k, m in plain.named_children() if k != "lin2"} == others
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert not hasattr(plain, "peft_config")
    inputs = spec.inputs()
    torch.testing.assert_close(model_output(plain(**inputs)), model_output(reference(**inputs)), atol=0, rtol=0)


def test_adding_or_loading_an_adapter_keeps_the_others_trainability(tmp_path):
    """A frozen (inference) adapter stays frozen when another is added; `load_adapter(..., is_trainable=True)`
    makes the new, inactive adapter trainable (as upstream), `is_trainable=False` leaves it frozen."""
    spec = TINY_MODELS["custom"]
    saved = get_peft_model(spec.build(), LoraConfig(target_modules=["lin1"], modules_to_save=["lin2"]))
    saved.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(spec.build(), tmp_path)
    assert trainable_names(model) == set()
    model.add_adapter("added", LoraConfig(target_modules=["conv"]))
    assert trainable_names(model) == set()
    model.load_adapter(tmp_path, "frozen")
    assert trainable_names(model) == set()
    model.load_adapter(tmp_path, "train_me", is_trainable=True)
    names = trainable_names(model)
    assert names and all(".train_me." in n for n in names)
    assert {n.split(".")[-3] for n in names} >= {"lora_A", "lora_B", "modules_to_save"}
    assert model.active_adapter == "default"
    model.set_requires_grad("train_me", requires_grad=False)
    assert trainable_names(model) == set()
    model.set_adapter("frozen", inference_mode=True)  # active, still frozen
    assert model.active_adapter == "frozen" and trainable_names(model) == set()
    model.set_adapter("frozen")
    assert trainable_names(model) and all(".frozen." in n for n in trainable_names(model))
    with pytest.raises(ValueError, match="nope"):
        model.set_requires_grad("nope")


def test_safe_merge_refuses_non_finite_weights():
    spec = TINY_MODELS["custom"]
    model = get_peft_model(spec.build(), LoraConfig(target_modules=["lin1"]))
    layer = model.get_base_model().lin1
    layer.lora_B["default"].weight.data.fill_(float("inf"))
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="default"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight) and not layer.merged


def test_generate_runs_through_the_wrapper():
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    ids = torch.tensor([[3, 4, 5]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


def test_mixed_model_is_importable_and_a_peft_model():
    assert issubclass(PeftMixedModel, PeftModel)
    model = get_peft_model(TINY_MODELS["custom"].build(), LoraConfig(target_modules=["lin1"]), mixed=True)
    assert isinstance(model, PeftMixedModel)


def test_inject_adapter_in_model_without_wrapper():
    spec = TINY_MODELS["custom"]
    base = spec.build()
    y = model_output(base(**spec.inputs()))
    out = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin1", "conv"]), base, adapter_name="ad")
    assert out is base and isinstance(base.lin1, LoraLayer) and isinstance(base.conv, LoraLayer)
    assert "lin1.lora_A.ad.weight" in base.state_dict()
    assert trainable_names(base) == {"lin1.lora_A.ad.weight", "lin1.lora_B.ad.weight", "conv.lora_A.ad.weight",
                                     "conv.lora_B.ad.weight"}
    torch.testing.assert_close(model_output(base(**spec.inputs())), y, atol=0, rtol=0)


# --- registration -----------------------------------------------------------------------------------------------
class _NoPrefixTuner(BaseTuner):
    pass


class _Unrelated:
    prefix = "x_"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "superlora", "config_cls": LoraConfig, "model_cls": LoraModel}, "superlora"),
        ({"name": 3, "config_cls": LoraConfig, "model_cls": LoraModel}, "name"),
        ({"name": "lora", "config_cls": dict, "model_cls": LoraModel}, "config_cls"),
        ({"name": "lora", "config_cls": LoraConfig, "model_cls": _Unrelated}, "model_cls"),
        ({"name": "lora", "config_cls": LoraConfig, "model_cls": _NoPrefixTuner}, "prefix"),
        ({"name": "loraga", "config_cls": LoraConfig, "model_cls": LoraModel}, "LoraConfig"),
    ],
)
def test_register_peft_method_rejects_junk(kwargs, message):
    from peft.registry import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    before = (dict(PEFT_TYPE_TO_CONFIG_MAPPING), dict(PEFT_TYPE_TO_TUNER_MAPPING))
    with pytest.raises((ValueError, TypeError, KeyError), match=message):
        register_peft_method(**kwargs)
    assert (dict(PEFT_TYPE_TO_CONFIG_MAPPING), dict(PEFT_TYPE_TO_TUNER_MAPPING)) == before


def test_register_conflicting_config_class_is_refused():
    class OtherLoraConfig(LoraConfig):
        pass

    with pytest.raises(KeyError, match="already registered"):
        register_peft_method(name="lora", config_cls=OtherLoraConfig, model_cls=LoraModel)
    register_peft_method(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_")  # idempotent
    assert PeftConfig.from_peft_type(peft_type="LORA").__class__ is LoraConfig


def test_mixed_adapter_batch_rows_follow_their_adapter_and_unknown_names_are_refused():
    """Upstream's per-sample `adapter_names=`: each row as if run alone; a bad name is a ValueError naming it."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "__base__"]).logits
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], adapted[0])
    torch.testing.assert_close(mixed[1], base[1])
    assert not torch.allclose(adapted[0], base[0])
    with pytest.raises(ValueError, match="nope"):
        model(input_ids=ids, adapter_names=["default", "nope"])


def test_push_to_hub_uploads_what_save_pretrained_writes(monkeypatch):
    """No network: a stand-in HfApi records the repo creation and the files of the uploaded folder."""
    import os

    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            seen["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            seen["files"] = sorted(os.listdir(folder_path))
            seen["message"] = commit_message
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert model.push_to_hub("me/adapter", commit_message="m", private=True, token="t") == "commit-info"
    assert seen["repo"] == ("me/adapter", True, True) and seen["token"] == "t" and seen["message"] == "m"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(seen["files"])
