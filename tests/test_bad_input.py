"""Bad input raises an error that names the problem, and a failed load leaves the model exactly as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from tests.helpers.lora_checks import assert_same_snapshot, module_snapshot, randomize_adapter
from tests.helpers.tiny_models import TINY_MODELS, model_output, tiny_llama

SPEC = TINY_MODELS["custom"]


def _saved_adapter(folder, **config):
    """Save a random adapter of the tiny custom net into `folder` and return its output on SPEC.inputs()."""
    kwargs = dict(r=2, target_modules=["lin1", "conv"], modules_to_save=["lin2"])
    kwargs.update(config)
    model = get_peft_model(SPEC.build(), LoraConfig(**kwargs))
    randomize_adapter(model, seed=4)
    model.save_pretrained(folder)
    with torch.no_grad():
        return model_output(model(**SPEC.inputs()))


def _edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture
def adapter_dir(tmp_path):
    _saved_adapter(tmp_path / "ad")
    return tmp_path / "ad"


# --- config files -----------------------------------------------------------------------------------------------
def test_unknown_peft_type(adapter_dir):
    _edit_config(adapter_dir, peft_type="SUPER_LORA")
    with pytest.raises(ValueError, match="SUPER_LORA"):
        PeftConfig.from_pretrained(adapter_dir)
    with pytest.raises(ValueError, match="SUPER_LORA"):
        PeftModel.from_pretrained(SPEC.build(), adapter_dir)


def test_missing_peft_type(adapter_dir):
    path = adapter_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["peft_type"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_pretrained(adapter_dir)


@pytest.mark.parametrize("text", ['{"peft_type": "LORA", "r": ', "[1, 2]", ""])
def test_malformed_config_json(adapter_dir, text):
    (adapter_dir / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftConfig.from_pretrained(adapter_dir)


def test_invalid_field_value_in_config(adapter_dir):
    _edit_config(adapter_dir, r=-3)
    with pytest.raises(ValueError, match="r=-3"):
        PeftConfig.from_pretrained(adapter_dir)


def test_missing_config_file(adapter_dir):
    os.remove(adapter_dir / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(SPEC.build(), adapter_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(SPEC.build(), adapter_dir / "nowhere")


# --- weight files -----------------------------------------------------------------------------------------------
def test_missing_weights_file(adapter_dir):
    os.remove(adapter_dir / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(SPEC.build(), adapter_dir)


def test_truncated_weights_file(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(SPEC.build(), adapter_dir)


def test_bin_weights_load_with_weights_only(tmp_path):
    """A `.bin` adapter loads (weights_only=True); a pickle carrying an arbitrary object is refused."""
    model = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    randomize_adapter(model, seed=5)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(SPEC.build(), tmp_path)
    for key, value in get_peft_model_state_dict(model).items():
        assert torch.equal(get_peft_model_state_dict(loaded)[key], value)

    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    state["evil"] = _Evil()
    torch.save(state, tmp_path / "adapter_model.bin")
    _Evil.ran = False
    with pytest.raises(ValueError, match=r"adapter_model.bin.*[Ww]eights.only"):
        PeftModel.from_pretrained(SPEC.build(), tmp_path)
    assert not _Evil.ran
    torch.load(tmp_path / "adapter_model.bin", weights_only=False)  # the file really carries a code-running object
    assert _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Evil.ran = True
    return "pwned"


def test_shape_mismatch_names_the_tensor(adapter_dir):
    _edit_config(adapter_dir, r=4)  # weights were saved with r=2
    with pytest.raises(ValueError, match=r"lin1\.lora_A\.weight.*\(2, 96\)"):
        PeftModel.from_pretrained(SPEC.build(), adapter_dir)


def test_weights_for_another_model(tmp_path):
    """Keys that fit no module of the model: the error counts and names them."""
    _saved_adapter(tmp_path, target_modules=["lin1"], modules_to_save=None)
    _edit_config(tmp_path, target_modules=["conv"])
    with pytest.raises(ValueError, match="unexpected keys.*lin1"):
        PeftModel.from_pretrained(SPEC.build(), tmp_path)


# --- targets and adapter names ----------------------------------------------------------------------------------
def test_target_modules_matching_nothing():
    model = SPEC.build()
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*lin1"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    assert_same_snapshot(before, module_snapshot(model))


def test_unsupported_target_type_leaves_model_unchanged():
    """`lin1` is adapted first, then the ReLU-free `TinyNet` has no LoRA layer for a BatchNorm: roll back."""
    model = SPEC.build()
    model.add_module("norm", torch.nn.BatchNorm1d(5))
    before = module_snapshot(model)
    with pytest.raises(ValueError, match="norm"):
        get_peft_model(model, LoraConfig(target_modules=["lin1", "norm"]))
    assert_same_snapshot(before, module_snapshot(model))


def test_modules_to_save_naming_nothing():
    model = SPEC.build()
    before = module_snapshot(model)
    with pytest.raises(ValueError, match="head"):
        get_peft_model(model, LoraConfig(target_modules=["lin1"], modules_to_save=["head"]))
    assert_same_snapshot(before, module_snapshot(model))


def test_unknown_adapter_names(tmp_path):
    model = get_peft_model(SPEC.build(), LoraConfig(target_modules=["lin1"]))
    for call in (
        lambda: model.set_adapter("nope"),
        lambda: model.delete_adapter("nope"),
        lambda: model.save_pretrained(tmp_path, selected_adapters=["nope"]),
        lambda: get_peft_model_state_dict(model, adapter_name="nope"),
        lambda: model.merge_adapter(adapter_names=["nope"]),
        lambda: model.merge_and_unload(adapter_names=["nope"]),
    ):
        with pytest.raises(ValueError, match="nope"):
            call()
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["lin1"]))
    with pytest.raises(ValueError, match="adapter_name"):
        get_peft_model(SPEC.build(), LoraConfig(target_modules=["lin1"]), adapter_name="a.b")


# --- failed loads change nothing --------------------------------------------------------------------------------
@pytest.mark.parametrize("breakage", ["shape", "truncated", "missing_key", "targets", "mts"])
def test_failed_from_pretrained_leaves_model_unchanged(adapter_dir, breakage):
    if breakage == "shape":
        _edit_config(adapter_dir, r=3)
    elif breakage == "truncated":
        path = adapter_dir / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif breakage == "missing_key":
        _edit_config(adapter_dir, target_modules=["lin1", "conv", "emb"])
    elif breakage == "targets":
        _edit_config(adapter_dir, target_modules=["nothing_here"])
    else:
        _edit_config(adapter_dir, modules_to_save=["head"])
    model = SPEC.build()
    model.lin2.weight.requires_grad_(False)  # an unusual requires_grad pattern must survive too
    model.train()
    before = module_snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError)):
        PeftModel.from_pretrained(model, adapter_dir)
    assert_same_snapshot(before, module_snapshot(model))


def _load_adapter_must_fail(good_dir, bad_dir, name):
    model = PeftModel.from_pretrained(SPEC.build(), good_dir, is_trainable=True)
    model.train()
    model.get_base_model().lin1.base_layer.bias.requires_grad_(True)  # unusual flags must survive too
    before = module_snapshot(model)
    config_before = {k: v.to_dict() for k, v in model.peft_config.items()}
    with pytest.raises(ValueError):
        model.load_adapter(bad_dir, name, is_trainable=True)
    assert_same_snapshot(before, module_snapshot(model))
    assert {k: v.to_dict() for k, v in model.peft_config.items()} == config_before
    assert model.active_adapter == "default"


@pytest.mark.parametrize("other", [{"r": 3}, {"target_modules": ["lin1"]}, {"modules_to_save": None}])
def test_failed_load_adapter_into_existing_name(tmp_path, other):
    """Weights saved from a differently shaped adapter do not fit the existing adapter "default"."""
    _saved_adapter(tmp_path / "good")
    _saved_adapter(tmp_path / "bad", **other)
    _load_adapter_must_fail(tmp_path / "good", tmp_path / "bad", "default")


@pytest.mark.parametrize("breakage", ["shape", "missing_key", "targets", "mts", "new_targets_then_shape"])
def test_failed_load_adapter_as_new_name(tmp_path, breakage):
    """The config injects a new adapter, then the weights do not fit it: the injection is undone."""
    _saved_adapter(tmp_path / "good")
    _saved_adapter(tmp_path / "bad")
    changes = {
        "shape": {"r": 3},
        "missing_key": {"target_modules": ["lin1", "conv", "emb"]},
        "targets": {"target_modules": ["nothing_here"]},
        "mts": {"modules_to_save": ["lin2", "head"]},
        "new_targets_then_shape": {"target_modules": ["lin1", "conv", "emb"], "r": 3},
    }[breakage]
    _edit_config(tmp_path / "bad", **changes)
    _load_adapter_must_fail(tmp_path / "good", tmp_path / "bad", "second")


# --- crash-safe saves -------------------------------------------------------------------------------------------
def test_failed_save_keeps_old_files(tmp_path, monkeypatch):
    _saved_adapter(tmp_path)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1", "conv"], modules_to_save=["lin2"]))
    randomize_adapter(model, seed=9)

    import safetensors.torch

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old, "old files changed or temp files left"

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_save_uses_temporary_name_then_rename(tmp_path, monkeypatch):
    """Every file lands through os.replace from a temporary name in the same folder."""
    calls = []
    real_replace = os.replace

    def recording_replace(src, dst):
        calls.append((os.path.dirname(src), os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    _saved_adapter(tmp_path)
    assert sorted(c[2] for c in calls) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert all(src != dst and folder == str(tmp_path) for folder, src, dst in calls)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("hooked_before", [False, True])
def test_failed_from_pretrained_with_checkpointing_leaves_no_input_grad_hook(tmp_path, hooked_before):
    """With gradient checkpointing on, PeftModel makes the embeddings' output require grad (a forward hook, added
    once); a failed load takes back the hook it added."""
    saved = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    saved.save_pretrained(tmp_path)
    model = tiny_llama()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if not hooked_before:
        model.disable_input_require_grads()
    hooks = _hook_count(model)
    assert hooks == int(hooked_before)
    _edit_config(tmp_path, r=3)
    with pytest.raises(ValueError, match="Shape mismatch"):
        PeftModel.from_pretrained(model, tmp_path)
    assert _hook_count(model) == hooks
    _edit_config(tmp_path, r=2)
    PeftModel.from_pretrained(model, tmp_path)
    assert _hook_count(model) == 1


def test_only_one_adapter_may_train_the_base_biases():
    model = get_peft_model(SPEC.build(), LoraConfig(target_modules=["lin1"], bias="all"))
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=r"\['default', 'b'\].*bias"):
        model.add_adapter("b", LoraConfig(target_modules=["conv"], bias="lora_only"))
    assert_same_snapshot(before, module_snapshot(model))
    assert list(model.peft_config) == ["default"]
    model.add_adapter("c", LoraConfig(target_modules=["conv"]))  # bias="none" beside it is fine


def test_ignore_mismatched_sizes_skips_those_tensors_with_a_warning(tmp_path):
    _saved_adapter(tmp_path / "ad", r=2)
    _edit_config(tmp_path / "ad", r=3)
    with pytest.warns(UserWarning, match="Skipped tensors of another shape"):
        model = PeftModel.from_pretrained(SPEC.build(), tmp_path / "ad", ignore_mismatched_sizes=True)
    with pytest.warns(UserWarning, match="Skipped tensors of another shape"):
        model.load_adapter(tmp_path / "ad", "other", ignore_mismatched_sizes=True)
    assert model.get_base_model().lin1.r == {"default": 3, "other": 3}


# --- config fields of the wrong kind: one table, three ways in ------------------------------------------------------
# (config class, field, bad value, fragment of the error). Every value is JSON-able (inf/nan as Infinity/NaN), so the
# same case runs through the constructor, through adapter_config.json, and as an assignment after construction.
_INF, _NAN = float("inf"), float("nan")
BAD_FIELDS = [
    ("LoraConfig", "r", _INF, "r=inf"),
    ("LoraConfig", "r", "8", "r='8'"),
    ("LoraConfig", "lora_alpha", _INF, "lora_alpha=inf"),
    ("LoraConfig", "lora_alpha", _NAN, "lora_alpha=nan"),
    ("LoraConfig", "lora_alpha", True, "lora_alpha=True"),
    ("LoraConfig", "lora_dropout", "0.1", "lora_dropout='0.1'"),
    ("LoraConfig", "lora_dropout", _NAN, "lora_dropout=nan"),
    ("LoraConfig", "rank_pattern", {"lin1": _INF}, r"rank_pattern\['lin1'\]=inf"),
    ("LoraConfig", "rank_pattern", {"lin1": 2.5}, r"rank_pattern\['lin1'\]=2.5"),
    ("LoraConfig", "rank_pattern", {"(lin1": 2}, r"rank_pattern=\{'\(lin1': 2\}.*regular expression"),
    ("LoraConfig", "alpha_pattern", {"lin1": _INF}, r"alpha_pattern\['lin1'\]=inf"),
    ("LoraConfig", "alpha_pattern", {"lin1[": 4}, r"alpha_pattern=\{'lin1\[': 4\}.*regular expression"),
    ("LoraConfig", "target_modules", 123, "target_modules=123"),
    ("LoraConfig", "target_modules", [1, 2], r"target_modules=\[1, 2\]"),
    ("LoraConfig", "target_modules", "(lin1", r"target_modules='\(lin1'.*regular expression"),
    ("LoraConfig", "exclude_modules", 123, "exclude_modules=123"),
    ("LoraConfig", "exclude_modules", "lin1[", r"exclude_modules='lin1\['.*regular expression"),
    ("LoraConfig", "modules_to_save", 123, "modules_to_save=123"),
    ("LoraConfig", "modules_to_save", "lin2", "modules_to_save='lin2'"),
    ("LoraConfig", "layers_to_transform", "0", "layers_to_transform='0'"),
    ("LoraConfig", "layers_to_transform", [0.5], r"layers_to_transform=\[0.5\]"),
    ("LoraConfig", "layers_pattern", 123, "layers_pattern=123"),
    ("LoraConfig", "use_rslora", "false", "use_rslora='false'"),
    ("LoraConfig", "fan_in_fan_out", "false", "fan_in_fan_out='false'"),
    ("LoraConfig", "init_lora_weights", 1, "init_lora_weights=1"),
    ("LoraConfig", "bias", None, "bias=None"),
    ("LoraConfig", "lora_ga_config", 123, "lora_ga_config=123"),
    ("LoraConfig", "trainable_token_indices", "5", "trainable_token_indices='5'"),
    ("LoraConfig", "inference_mode", "false", "inference_mode='false'"),
    ("LoraConfig", "task_type", 123, "task_type=123"),
    ("LoraConfig", "base_model_name_or_path", 123, "base_model_name_or_path=123"),
    ("LoraConfig", "revision", 123, "revision=123"),
    ("LoraConfig", "peft_version", 1.0, "peft_version=1.0"),
    ("LoraConfig", "auto_mapping", "AutoModel", "auto_mapping='AutoModel'"),
    ("LoraGAConfig", "stable_gamma", _INF, "stable_gamma=inf"),
    ("LoraGAConfig", "stable_gamma", _NAN, "stable_gamma=nan"),
    ("LoraGAConfig", "bsz", "2", "bsz='2'"),
    ("LoraGAConfig", "direction", 123, "direction=123"),
    ("LoraProConfig", "damping", _INF, "damping=inf"),
    ("LoraProConfig", "damping", "1e-8", "damping='1e-8'"),
    ("LoraProConfig", "mode", None, "mode=None"),
]
_IDS = [f"{cls}.{name}={value!r}" for cls, name, value, _ in BAD_FIELDS]
_GOOD = dict(r=2, target_modules=["lin1", "conv"], modules_to_save=["lin2"])


def _config_cls(name: str):
    import peft

    return getattr(peft, name)


def _good_kwargs(field: str) -> dict:
    kwargs = dict(_GOOD)
    if field == "layers_pattern":  # layers_pattern needs layers_to_transform beside it
        kwargs["layers_to_transform"] = [0]
    return kwargs


@pytest.mark.parametrize(("cls", "field", "value", "match"), BAD_FIELDS, ids=_IDS)
def test_bad_field_in_constructor(cls, field, value, match):
    with pytest.raises(ValueError, match=f"Invalid {match}") as info:
        _config_cls(cls)(**{**_good_kwargs(field), field: value})
    assert ": expected " in str(info.value)


@pytest.mark.parametrize(("cls", "field", "value", "match"), BAD_FIELDS, ids=_IDS)
def test_bad_field_in_adapter_config_json(tmp_path, cls, field, value, match):
    """The same values in adapter_config.json: refused by PeftConfig.from_pretrained and PeftModel.from_pretrained
    (the file is named), before the model is touched."""
    _saved_adapter(tmp_path, **_GOOD)
    data = _config_cls(cls)(**_good_kwargs(field)).to_dict()
    data[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"adapter_config.json.*Invalid {match}"):
        PeftConfig.from_pretrained(tmp_path)
    model = SPEC.build()
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_same_snapshot(before, module_snapshot(model))


@pytest.mark.parametrize(("cls", "field", "value", "match"), BAD_FIELDS, ids=_IDS)
def test_bad_field_assigned_after_construction(cls, field, value, match):
    """`config.<field> = value` is checked at once (TRL assigns trainable_token_indices, users set `config.r`);
    the config keeps its old value and still builds a model."""
    config = _config_cls(cls)(**_good_kwargs(field))
    old = config.to_dict()
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        setattr(config, field, value)
    assert config.to_dict() == old
    if cls == "LoraConfig" and field != "layers_pattern":  # (the tiny net has no numbered blocks)
        get_peft_model(SPEC.build(), config)


def test_good_assignments_after_construction_are_used():
    config = LoraConfig(r=2, target_modules=["lin1"])
    config.r = 4
    config.target_modules = ("lin1", "conv")
    config.lora_alpha = 8.0
    config.trainable_token_indices = {"emb": (1, 2)}
    assert config.target_modules == {"lin1", "conv"} and config.trainable_token_indices == {"emb": [1, 2]}
    model = get_peft_model(SPEC.build(), config)
    assert model.get_base_model().conv.r["default"] == 4


def test_bools_from_json_stay_bools(tmp_path):
    _saved_adapter(tmp_path, use_rslora=True)
    config = PeftConfig.from_pretrained(tmp_path)
    assert config.use_rslora is True and config.fan_in_fan_out is False and config.inference_mode is True


# --- a rank too large to allocate -----------------------------------------------------------------------------------
def test_rank_too_large_to_allocate_is_refused_before_allocating(tmp_path):
    r = 2**40
    model = SPEC.build()
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=rf"r={r}.*bytes"):
        get_peft_model(model, LoraConfig(r=r, target_modules=["lin1"]))
    assert_same_snapshot(before, module_snapshot(model))
    with pytest.raises(ValueError, match=rf"r={r}.*bytes"):
        get_peft_model(model, LoraConfig(target_modules=["lin1"], rank_pattern={"lin1": r}))
    assert_same_snapshot(before, module_snapshot(model))
    _saved_adapter(tmp_path / "ad")
    _edit_config(tmp_path / "ad", r=r)
    config = PeftConfig.from_pretrained(tmp_path / "ad")  # a valid config: the size depends on the layer
    with pytest.raises(ValueError, match=rf"r={r}.*bytes"):
        PeftModel.from_pretrained(model, tmp_path / "ad", config=config)
    assert_same_snapshot(before, module_snapshot(model))


def test_rank_size_check_counts_both_factors(monkeypatch):
    """lin1 is Linear(96, 16): A and B of rank 2 hold 2 * (96 + 16) fp32 values = 896 bytes; conv (8 -> 6, 3x3)
    holds 2 * (8 * 9 + 6) = 156 values."""
    import peft.tuners.lora.layer as lora_layer

    monkeypatch.setattr(lora_layer, "available_memory_bytes", lambda: 895)
    with pytest.raises(ValueError, match=r"r=2 for adapter 'default' on Linear\(in_features=96.*896 bytes.*895 bytes"):
        get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    monkeypatch.setattr(lora_layer, "available_memory_bytes", lambda: 896)
    get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    monkeypatch.setattr(lora_layer, "available_memory_bytes", lambda: 4 * 156 - 1)
    with pytest.raises(ValueError, match=r"r=2 .*on Conv2d.*624 bytes"):
        get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["conv"]))


# --- a model that already is a PeftModel ----------------------------------------------------------------------------
def test_from_pretrained_on_a_peft_model_says_to_use_load_adapter(adapter_dir):
    peft_model = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    before = module_snapshot(peft_model)
    with pytest.raises(ValueError, match=r"already a PeftModel.*load_adapter\("):
        PeftModel.from_pretrained(peft_model, adapter_dir)
    assert_same_snapshot(before, module_snapshot(peft_model))
    assert list(peft_model.peft_config) == ["default"]
    peft_model.load_adapter(adapter_dir, adapter_name="loaded")  # what the message says works
    assert set(peft_model.peft_config) == {"default", "loaded"}


@pytest.mark.parametrize("mixed", [False, True])
def test_get_peft_model_on_a_peft_model_says_to_use_add_adapter(mixed):
    peft_model = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    before = module_snapshot(peft_model)
    with pytest.raises(ValueError, match=r"already a PeftModel.*add_adapter\("):
        get_peft_model(peft_model, LoraConfig(r=2, target_modules=["conv"]), mixed=mixed)
    with pytest.raises(ValueError, match=r"already a PeftModel.*add_adapter\("):
        PeftModel(peft_model, LoraConfig(r=2, target_modules=["conv"]))
    assert_same_snapshot(before, module_snapshot(peft_model))
    assert list(peft_model.peft_config) == ["default"]
