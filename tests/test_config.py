"""PeftConfig / LoraConfig: validation, the adapter_config.json round trip, and loading from a folder or the hub."""

from __future__ import annotations

import json
import time
import warnings

import pytest

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
    data["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="use_dora=True"):
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
