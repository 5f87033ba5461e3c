"""PeftConfig / LoraConfig: validation, the adapter_config.json round trip, and loading from a folder or the hub."""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch

import peft
from peft import LoraConfig, PeftConfig, PeftModel, PeftType, TaskType, get_peft_model
from tests.helpers.lora_checks import randomize_adapter
from tests.helpers.tiny_models import TINY_MODELS, model_output


def test_enums_have_upstream_values():
    assert {p.value for p in PeftType} >= {"LORA", "LORAGA", "LORAPRO"}
    assert {t.value for t in TaskType} == {"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
                                           "FEATURE_EXTRACTION"}
    config = LoraConfig(task_type="CAUSAL_LM")
    assert config.peft_type is PeftType.LORA and config.task_type is TaskType.CAUSAL_LM
    assert config.peft_version == peft.__version__
    assert config.is_prompt_learning is False and config.is_adaption_prompt is False


def test_version_passes_transformers_minimum():
    from packaging import version

    assert version.parse(peft.__version__) >= version.parse("0.20.0")
    assert version.parse(peft.__version__).local, "the version marks this fork with a local label"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r=0"), ({"r": 2.5}, "r=2.5"), ({"r": True}, "r=True"), ({"lora_alpha": 0}, "lora_alpha=0"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"), ({"bias": "some"}, "bias='some'"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights='xavier'"),
        ({"layers_pattern": "layers"}, "layers_pattern='layers'"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "target_modules='.*q'"),
        ({"rank_pattern": {"q": -1}}, r"rank_pattern\['q'\]=-1"), ({"alpha_pattern": []}, "alpha_pattern=\\[\\]"),
        ({"task_type": "TRANSLATE"}, "TRANSLATE"), ({"peft_type": "LORAPRO"}, "LORAPRO"),
    ],
)
def test_lora_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


def test_json_round_trip(tmp_path):
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["value", "query"], exclude_modules=["x"],
        rank_pattern={"query": 2}, alpha_pattern={"value": 3}, modules_to_save=["classifier"], use_rslora=True,
        layers_to_transform=[0, 1], layers_pattern="layer", init_lora_weights="gaussian", bias="lora_only",
    )
    config.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert list(data) == sorted(data), "keys are sorted"
    assert data["target_modules"] == ["query", "value"] and data["exclude_modules"] == ["x"]
    assert data["peft_type"] == "LORA" and data["task_type"] == "SEQ_CLS"
    assert {"base_model_name_or_path", "revision", "inference_mode", "peft_version"} <= data.keys()
    for loader in (PeftConfig.from_pretrained, LoraConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is LoraConfig and loaded.to_dict() == config.to_dict()
    assert not list(tmp_path.glob("*.tmp")), "no temporary file left behind"


def test_from_pretrained_kwargs_override_file(tmp_path):
    LoraConfig(r=4, target_modules=["q"]).save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path, r=2, inference_mode=True).r == 2


def test_unknown_keys_are_dropped_with_a_warning_and_unsupported_features_refused(tmp_path):
    data = LoraConfig(target_modules=["q"]).to_dict()
    data.update(brand_new_option=3, use_dora=False, megatron_core="megatron.core")  # inert upstream values pass
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="brand_new_option"):
        config = PeftConfig.from_pretrained(tmp_path)
    assert not hasattr(config, "brand_new_option")
    data["use_qalora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="use_qalora=True"):
        PeftConfig.from_pretrained(tmp_path)


def test_save_pretrained_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        LoraConfig().save_pretrained(tmp_path / "f")


# --- hub ids ----------------------------------------------------------------------------------------------------
def _fake_hub_cache(cache, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40):
    """Lay out huggingface_hub's cache (`models--a--b/refs/main`, `snapshots/<commit>/...`) without a download."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)


def test_hub_id_not_cached_fails_fast_offline(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1.*not in the local cache"):
        PeftConfig.from_pretrained("someone/not-cached-adapter", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not-cached-adapter"):
        PeftModel.from_pretrained(TINY_MODELS["custom"].build(), "someone/not-cached-adapter",
                                  cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5, "offline lookups must not wait on the network"


def test_hub_id_from_cache_offline(tmp_path):
    """A hub id whose files are in the local cache loads offline (config and weights, also from a subfolder)."""
    spec = TINY_MODELS["custom"]
    model = get_peft_model(spec.build(), LoraConfig(r=2, target_modules=["lin1"]))
    randomize_adapter(model, seed=2)
    expected = model_output(model(**spec.inputs()))
    model.save_pretrained(tmp_path / "saved")
    files = {f"sub/{p.name}": p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-adapter", files)
    cache = str(tmp_path / "cache")
    config = PeftConfig.from_pretrained("someone/tiny-adapter", subfolder="sub", cache_dir=cache)
    assert config.target_modules == {"lin1"}
    loaded = PeftModel.from_pretrained(spec.build(), "someone/tiny-adapter", subfolder="sub", cache_dir=cache)
    assert (model_output(loaded(**spec.inputs())) - expected).abs().max() == 0
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftConfig.from_pretrained("someone/tiny-adapter", cache_dir=cache)  # not at the repo root
    with warnings.catch_warnings():  # hub options go to the hub, not into the config as unknown keys
        warnings.simplefilter("error")
        config = PeftConfig.from_pretrained("someone/tiny-adapter", subfolder="sub", cache_dir=cache,
                                            local_files_only=True)
        loaded = PeftModel.from_pretrained(spec.build(), "someone/tiny-adapter", subfolder="sub", cache_dir=cache,
                                           local_files_only=True, torch_device="cpu")
    assert config.target_modules == {"lin1"} and not hasattr(config, "local_files_only")
    assert (model_output(loaded(**spec.inputs())) - expected).abs().max() == 0


def test_bin_only_cached_hub_adapter_loads_offline(tmp_path):
    spec = TINY_MODELS["custom"]
    model = get_peft_model(spec.build(), LoraConfig(r=2, target_modules=["lin1"]))
    randomize_adapter(model, seed=3)
    model.save_pretrained(tmp_path / "saved", safe_serialization=False)
    files = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    assert "adapter_model.bin" in files and "adapter_model.safetensors" not in files
    _fake_hub_cache(tmp_path / "cache", "someone/bin-adapter", files)
    loaded = PeftModel.from_pretrained(spec.build(), "someone/bin-adapter", cache_dir=str(tmp_path / "cache"))
    assert (model_output(loaded(**spec.inputs())) - model_output(model(**spec.inputs()))).abs().max() == 0


# --- prompt-learning configs: upstream's fields, JSON round trip, and a refusal wherever a model would be built ---
def _prompt_configs() -> dict:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "PREFIX_TUNING": PrefixTuningConfig(num_virtual_tokens=5, token_dim=16, num_layers=2, num_attention_heads=2,
                                            prefix_projection=True, encoder_hidden_size=8, init_weights="zero",
                                            task_type="CAUSAL_LM"),
        "PROMPT_TUNING": PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", task_type="SEQ_CLS",
                                            prompt_tuning_init_text="classify:", tokenizer_name_or_path="tok",
                                            tokenizer_kwargs={"use_fast": True}, modules_to_save=["classifier"]),
        "P_TUNING": PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
                                        encoder_hidden_size=8, encoder_num_layers=1, encoder_dropout=0.1),
    }


def test_prompt_learning_configs_have_upstreams_fields_and_defaults():
    from peft import (
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptLearningConfig,
        PromptTuningConfig,
        PromptTuningInit,
    )

    shared = {"num_virtual_tokens": None, "token_dim": None, "num_transformer_submodules": None,
              "num_attention_heads": None, "num_layers": None, "modules_to_save": None}
    expected = {
        PrefixTuningConfig: ("PREFIX_TUNING", {"init_weights": None, "encoder_hidden_size": None,
                                               "prefix_projection": False}),
        PromptTuningConfig: ("PROMPT_TUNING", {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                                               "tokenizer_name_or_path": None, "tokenizer_kwargs": None}),
        PromptEncoderConfig: ("P_TUNING", {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": None,
                                           "encoder_num_layers": 2, "encoder_dropout": 0.0}),
    }
    base_fields = set(LoraConfig().to_dict()) & set(PeftConfig().to_dict())
    for cls, (peft_type, own) in expected.items():
        data = cls().to_dict()
        assert data.keys() == base_fields | shared.keys() | own.keys(), cls
        assert {k: data[k] for k in {**shared, **own}} == {**shared, **own} and data["peft_type"] == peft_type
        assert issubclass(cls, PromptLearningConfig) and cls().is_prompt_learning and not cls().is_adaption_prompt
    assert PromptTuningConfig().prompt_tuning_init is PromptTuningInit.RANDOM
    assert PromptEncoderConfig().encoder_reparameterization_type is PromptEncoderReparameterizationType.MLP


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        ("PromptTuningConfig", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "x"},
         "tokenizer_name_or_path=None"),
        ("PromptTuningConfig", {"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t"},
         "prompt_tuning_init_text=None"),
        ("PromptTuningConfig", {"tokenizer_kwargs": {"a": 1}}, "tokenizer_kwargs=.*only with"),
        ("PromptTuningConfig", {"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init 'ZEROS'"),
        ("PromptEncoderConfig", {"encoder_reparameterization_type": "GRU"}, "'GRU'"),
        ("PromptEncoderConfig", {"encoder_dropout": 1.0}, "encoder_dropout=1.0"),
        ("PrefixTuningConfig", {"init_weights": "ones"}, "init_weights='ones'"),
        ("PrefixTuningConfig", {"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
        ("PrefixTuningConfig", {"peft_type": "LORA"}, "PREFIX_TUNING"),
    ],
)
def test_prompt_learning_configs_reject_bad_values(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(peft, cls)(**kwargs)


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"])
def test_prompt_learning_config_json_round_trip(tmp_path, peft_type):
    config = _prompt_configs()[peft_type]
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == peft_type and list(data) == sorted(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key is known: nothing dropped
        loaded = PeftConfig.from_pretrained(tmp_path)
        again = type(config).from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.to_dict() == config.to_dict() == again.to_dict()
    with pytest.raises(ValueError, match="not a LoraConfig"):
        LoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"])
def test_prompt_learning_is_refused_at_every_entry_point_and_the_model_is_untouched(tmp_path, peft_type):
    from peft import PeftMixedModel, inject_adapter_in_model

    config = _prompt_configs()[peft_type]
    config.save_pretrained(tmp_path / "saved")  # a config-only folder, as upstream's adapter minus its weights
    method = {"PREFIX_TUNING": "prefix tuning", "PROMPT_TUNING": "prompt tuning", "P_TUNING": "P-tuning"}[peft_type]
    match = f"{method} \\({peft_type}\\) is a prompt-learning method"
    model = TINY_MODELS["llama"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    attempts = [
        lambda: get_peft_model(model, config), lambda: get_peft_model(model, config, mixed=True),
        lambda: PeftModel(model, config), lambda: PeftMixedModel(model, config),
        lambda: inject_adapter_in_model(config, model), lambda: PeftModel.from_pretrained(model, tmp_path / "saved"),
    ]
    for attempt in attempts:
        with pytest.raises(NotImplementedError, match=match):
            attempt()
    assert [type(m) for m in model.modules()] == modules and not hasattr(model, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert config.modules_to_save == _prompt_configs()[peft_type].modules_to_save, "the config is not changed"

    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    with pytest.raises(NotImplementedError, match=match):
        lora.load_adapter(str(tmp_path / "saved"), adapter_name="prompt")
    with pytest.raises(NotImplementedError, match=match):
        lora.add_adapter("prompt", config)
    assert list(lora.peft_config) == ["default"] and lora.state_dict().keys() == state.keys()


@pytest.mark.upstream
def test_prompt_learning_configs_move_both_ways_with_upstream(tmp_path):
    """Upstream PEFT 0.21.2 reads our files as the same configs, and we read its files without dropping a key."""
    from tests.upstream_harness import UpstreamUnavailable, ensure_upstream_peft, run_upstream

    try:
        ensure_upstream_peft()
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    configs = _prompt_configs()
    for name, config in configs.items():
        config.save_pretrained(tmp_path / "ours" / name)
    script = '''
import json, sys
from pathlib import Path
import peft
from peft import PeftConfig
root = Path(sys.argv[1])
out = {}
for folder in sorted((root / "ours").iterdir()):
    config = PeftConfig.from_pretrained(str(folder))
    mine = json.loads((folder / "adapter_config.json").read_text())
    kwargs = {k: v for k, v in mine.items() if k not in ("peft_type", "peft_version")}
    type(config)(**kwargs).save_pretrained(str(root / "upstream" / folder.name))
    out[folder.name] = {"class": type(config).__name__, "config": json.loads(json.dumps(config.to_dict(), default=str))}
emit(out)
'''
    report = run_upstream(script, args=[str(tmp_path)], timeout=120).data
    for name, config in configs.items():
        assert report[name]["class"] == type(config).__name__
        theirs = {k: v for k, v in report[name]["config"].items() if k != "peft_version"}
        assert theirs == {k: v for k, v in config.to_dict().items() if k != "peft_version"}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = PeftConfig.from_pretrained(tmp_path / "upstream" / name)
        assert type(loaded) is type(config)
        assert {**loaded.to_dict(), "peft_version": None} == {**config.to_dict(), "peft_version": None}


# --- one table of field rules ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name", ["PeftConfig", "LoraConfig", "LoraGAConfig", "LoraProConfig"])
def test_every_field_of_the_lora_family_has_a_rule(cls_name):
    import dataclasses

    from peft.config import _rules_of

    cls = getattr(peft, cls_name)
    assert {f.name for f in dataclasses.fields(cls)} == set(_rules_of(cls))


def test_accepted_values_are_stored_in_their_json_form(tmp_path):
    import numpy as np

    config = LoraConfig(r=np.int64(4), lora_alpha=np.float32(8.5), target_modules=("q", "v"), layers_to_transform=(0,),
                        modules_to_save=("head",), base_model_name_or_path=tmp_path, rank_pattern=None)
    assert type(config.r) is int and type(config.lora_alpha) is float and config.target_modules == {"q", "v"}
    assert config.layers_to_transform == [0] and config.modules_to_save == ["head"]
    assert config.base_model_name_or_path == str(tmp_path) and config.rank_pattern is None
    config.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_copies_and_pickles_keep_the_values():
    import copy
    import dataclasses
    import pickle

    config = LoraConfig(r=4, target_modules=["q"], rank_pattern={"q": 2}, trainable_token_indices=[1])
    for clone in (copy.deepcopy(config), pickle.loads(pickle.dumps(config)), dataclasses.replace(config)):
        assert clone.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="Invalid r=0"):
        dataclasses.replace(config, r=0)


def test_validate_rechecks_values_changed_in_place_and_across_fields():
    config = LoraConfig(target_modules=["q"], rank_pattern={"q": 2})
    config.validate()
    config.rank_pattern["k"] = 0  # no assignment of the field: only validate() sees it
    with pytest.raises(ValueError, match=r"rank_pattern\['k'\]=0"):
        config.validate()
    config = LoraConfig(target_modules=".*q")
    config.layers_to_transform = [0]  # each field is fine alone; together they are not
    with pytest.raises(ValueError, match="target_modules='.*q'.*layers_to_transform"):
        config.validate()


def test_shared_fields_are_checked_for_prompt_learning_configs_too():
    from peft import PrefixTuningConfig

    with pytest.raises(ValueError, match="Invalid inference_mode='false'"):
        PrefixTuningConfig(inference_mode="false")
    config = PrefixTuningConfig()
    with pytest.raises(ValueError, match="Invalid peft_type='LORA'.*PREFIX_TUNING"):
        config.peft_type = "LORA"
