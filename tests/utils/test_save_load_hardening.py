"""Saving and loading against hostile or broken input (issue 12, items 1-4):

1. adapter names are single safe path components, checked at every entry point, and a save never writes outside
   its folder;
2. an adapter file loads only into the adapter's own tensors (never over a base tensor);
3. a folder's config and weights are one pair: a reader sees the old pair or the new one, never a mix, with real
   processes killed (kill -9) mid-save and saving concurrently;
4. NaN / infinite values and non-floating-point tensors are refused by name.

Every failed load leaves the model as it was.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft import (
    LoraConfig,
    PeftMixedModel,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora.layer import LoraLayer
from peft.utils.save_and_load import load_peft_weights
from tests.helpers.lora_checks import randomize_adapter
from tests.helpers.tiny_models import TINY_MODELS, tiny_llama

SPEC = TINY_MODELS["custom"]
WEIGHTS = "adapter_model.safetensors"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _edit_weights(folder: Path, change) -> None:
    """Rewrite the folder's safetensors file with `change(weights)` applied (no pairing record: a foreign file)."""
    weights = load_file(str(folder / WEIGHTS))
    change(weights)
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})


# --- the model the forked savers save: value v -> lora_alpha v and every LoRA entry v ---------------------------------
def _tiny_base() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4))


def _valued(value: int) -> PeftModel:
    model = get_peft_model(_tiny_base(), LoraConfig(r=2, lora_alpha=value, target_modules=["0"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.fill_(value)
    return model


def _read_pair(folder: Path) -> tuple[float, float]:
    """(lora_alpha of the config, value of the weights) as PeftModel.from_pretrained loads them."""
    model = PeftModel.from_pretrained(_tiny_base(), folder)
    layer = model.get_base_model()[0]
    return model.peft_config["default"].lora_alpha, layer.lora_A["default"].weight[0, 0].item()


# --- savers in forked processes (this process has everything imported: a fork starts in milliseconds) ---------------
_FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
needs_fork = pytest.mark.skipif(_FORK is None, reason="the save/kill tests fork processes (POSIX)")


def _saver(conn, folder: str, mode: str, first: int, count: int, go: str | None) -> None:
    """Child: save `_valued(v)` for v in [first, first + count) into `folder`, with `mode`'s hook; says "ready"
    before and "done" after (or the traceback)."""
    import safetensors.torch

    import peft.config

    torch.set_num_threads(1)
    save_config, save_file = peft.config.PeftConfig.save_pretrained, safetensors.torch.save_file

    def stop_before_config(self, *args, **kwargs):  # the new weights are in place, the config not yet written
        conn.send("between")
        time.sleep(600)

    def stop_in_temporary(tensors, path, metadata=None):  # the new weights are under their temporary name
        save_file(tensors, path, metadata=metadata)
        conn.send("tmp")
        time.sleep(600)

    def slow_config(self, *args, **kwargs):  # widen the gap between a save's two files
        time.sleep(0.01)
        save_config(self, *args, **kwargs)

    try:
        if mode in ("between", "slow"):
            peft.config.PeftConfig.save_pretrained = stop_before_config if mode == "between" else slow_config
        elif mode == "tmp":
            safetensors.torch.save_file = stop_in_temporary
        conn.send("ready")
        while go is not None and not os.path.exists(go):
            time.sleep(0.002)
        for value in range(first, first + count):
            _valued(value).save_pretrained(folder)
        conn.send("done")
    except BaseException:  # noqa: B036 - reported to the parent, then the child ends
        conn.send("error: " + traceback.format_exc())


class _Child:
    def __init__(self, folder: Path, mode: str, first: int, count: int, go: Path | None = None) -> None:
        self.conn, child_conn = _FORK.Pipe(duplex=False)
        args = (child_conn, str(folder), mode, first, count, str(go) if go else None)
        self.process = _FORK.Process(target=_saver, args=args, daemon=True)
        self.process.start()
        child_conn.close()

    def said(self, word: str, timeout: float = 30) -> None:
        message = self.conn.recv() if self.conn.poll(timeout) else f"nothing in {timeout} s"
        assert message == word, f"child said {message!r}, expected {word!r}"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # SIGKILL: no finally, no atexit
        self.process.join()


def _kill(children: list[_Child]) -> None:
    for child in children:
        child.kill()


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# === 1. adapter names ===============================================================================================
BAD_NAMES = ["/abs/x", "../x", "a/b", "a\\b", "C:\\x", ".", "..", "", "a\x00b", "a.b", 7, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_unsafe_adapter_name_is_refused_at_every_entry_point_model_unchanged(tmp_path, name):
    saved = tmp_path / "saved"
    _valued(1).save_pretrained(saved)
    message = re.escape(f"Invalid adapter_name {name!r}")
    base = _tiny_base()

    def config():
        return LoraConfig(r=2, target_modules=["0"])

    attempts = {
        "get_peft_model": lambda: get_peft_model(base, config(), adapter_name=name),
        "get_peft_model(mixed=True)": lambda: get_peft_model(base, config(), adapter_name=name, mixed=True),
        "PeftModel": lambda: PeftModel(base, config(), name),
        "PeftMixedModel": lambda: PeftMixedModel(base, config(), name),
        "inject_adapter_in_model": lambda: inject_adapter_in_model(config(), base, adapter_name=name),
        "from_pretrained": lambda: PeftModel.from_pretrained(base, saved, adapter_name=name),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ValueError, match=message):
            attempt()
        assert type(base[0]) is nn.Linear and not hasattr(base, "peft_config"), what
    for model in (get_peft_model(_tiny_base(), config()), get_peft_model(_tiny_base(), config(), mixed=True)):
        before = _state(model)
        with pytest.raises(ValueError, match=message):
            model.add_adapter(name, config())
        with pytest.raises(ValueError, match=message):
            model.load_adapter(saved, name)
        assert list(model.peft_config) == ["default"]
        _assert_unchanged(model, before)


def test_absolute_adapter_name_cannot_make_save_pretrained_write_elsewhere(tmp_path):
    """Before: `adapter_name="/abs/path"` passed (no dot), and save_pretrained wrote the adapter to /abs/path."""
    outside = tmp_path / "outside"
    with pytest.raises(ValueError, match="Invalid adapter_name"):
        get_peft_model(_tiny_base(), LoraConfig(r=2, target_modules=["0"]), adapter_name=str(outside))
    model = _valued(1)
    with pytest.raises(ValueError, match="Invalid adapter_name"):
        model.add_adapter(str(outside), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path / "save")
    assert not outside.exists()


def test_save_pretrained_never_writes_outside_save_directory(tmp_path):
    """A name that reached `peft_config` some other way, or a sub-folder that is a link to elsewhere: refused
    before anything is written."""
    save, outside = tmp_path / "save", tmp_path / "outside"
    model = _valued(1)
    model.peft_config[str(outside)] = model.peft_config["default"]  # bypasses add_adapter's check
    model.peft_config["../outside"] = model.peft_config["default"]
    for selected in ([str(outside)], ["../outside"], None):
        with pytest.raises(ValueError, match="Invalid adapter_name"):
            model.save_pretrained(save, selected_adapters=selected)
    assert not outside.exists() and not save.exists()
    del model.peft_config[str(outside)], model.peft_config["../outside"]

    model.add_adapter("linked", LoraConfig(r=2, target_modules=["0"]))
    outside.mkdir()
    save.mkdir()
    (save / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the save folder"):
        model.save_pretrained(save)
    assert not any(outside.iterdir()) and list(save.iterdir()) == [save / "linked"]


def test_transformers_add_adapter_and_load_adapter_refuse_unsafe_names(tmp_path):
    saved = tmp_path / "saved"
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(saved)
    attempts = [
        lambda model: model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=str(tmp_path / "x")),
        lambda model: model.load_adapter(str(saved), adapter_name="../outside"),
    ]
    for attempt in attempts:  # a fresh model each: transformers marks a model as having adapters before injecting
        model = tiny_llama()
        before = _state(model)
        with pytest.raises(ValueError, match="Invalid adapter_name"):
            attempt(model)
        assert not any(isinstance(m, LoraLayer) for m in model.modules())
        _assert_unchanged(model, before)


# === 2. an adapter file holds the adapter's tensors only ============================================================
def test_adapter_file_cannot_overwrite_a_base_tensor(tmp_path):
    """Before: a key naming a base tensor verbatim was loaded into it (here: the input embedding)."""
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    key = "base_model.model.model.embed_tokens.weight"
    _edit_weights(tmp_path, lambda w: w.update({key: torch.zeros(64, 16)}))
    message = re.escape(key) + ".*name base-model tensors"

    base = tiny_llama()
    before = _state(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    _assert_unchanged(base, before)

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = _state(model)
    for name in ("default", "other"):  # over an existing adapter, and as a new one
        with pytest.raises(ValueError, match=message):
            model.load_adapter(tmp_path, name)
    assert list(model.peft_config) == ["default"]
    _assert_unchanged(model, before)


_BIAS_SHAPES = {"lin1.base_layer.bias": (16,), "lin1.bias": (16,), "lin2.bias": (5,), "conv.base_layer.bias": (6,),
                "lin2.weight": (5, 16)}


# A bias in the file was trained by the saver (upstream saves them for bias="all" / "lora_only"): every bias the
# model has loads, with a warning when this config does not train it; nothing else of the base does.
@pytest.mark.parametrize("bias, key, accepted", [
    ("none", "lin1.base_layer.bias", "warns"),
    ("none", "lin2.bias", "warns"),
    ("lora_only", "lin1.base_layer.bias", True),
    ("lora_only", "lin1.bias", True),  # older files of this fork
    ("lora_only", "conv.base_layer.bias", True),  # adapted by another adapter: lora_only trains it too
    ("lora_only", "lin2.bias", "warns"),  # not an adapted layer
    ("all", "lin2.bias", True),
    ("all", "lin2.weight", False),
    ("none", "lin2.weight", False),
])
def test_biases_load_and_nothing_else_of_the_base(bias, key, accepted):
    def build():
        model = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"], bias=bias))
        model.add_adapter("other", LoraConfig(r=2, target_modules=["conv"]))
        return model

    state = get_peft_model_state_dict(build())
    state.pop("base_model.model.lin1.base_layer.bias", None)  # so that an alias of it is what loads
    state["base_model.model." + key] = torch.full(_BIAS_SHAPES[key], 0.5)
    target = build()
    before = _state(target)
    if accepted:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_peft_model_state_dict(target, state)
        untrained = [str(w.message) for w in caught if "does not train them" in str(w.message)]
        assert len(untrained) == (accepted == "warns")
        if untrained:
            assert "base_model.model." + key.replace("lin1.bias", "lin1.base_layer.bias") in untrained[0]
        loaded = target.get_base_model().get_submodule(key.rsplit(".", 1)[0])
        assert torch.equal(loaded.bias if key.endswith("bias") else loaded.weight, torch.full(_BIAS_SHAPES[key], 0.5))
        return
    with pytest.raises(ValueError, match=re.escape("base_model.model." + key)):
        set_peft_model_state_dict(target, state)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head", "q_proj"], ["q_proj"]])
def test_embedding_base_weights_load_only_when_the_adapter_adapts_the_embedding(targets):
    """Upstream's `save_embedding_layers` writes `<embedding>.base_layer.weight` of a targeted embedding; nothing
    else of the base loads."""
    targeted = "embed_tokens" in targets
    state = get_peft_model_state_dict(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=targets)))
    keys = (["base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.base_layer.weight"]
            if targeted else ["base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"])
    target = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=targets))
    before = _state(target)
    with pytest.raises(ValueError, match=re.escape("base_model.model.model.norm.weight")):
        set_peft_model_state_dict(target, dict(state, **{"base_model.model.model.norm.weight": torch.ones(16)}))
    _assert_unchanged(target, before)
    extra = {key: torch.full((64, 16), 0.25) for key in keys}
    if not targeted:
        with pytest.raises(ValueError, match=re.escape(keys[0])):
            set_peft_model_state_dict(target, dict(state, **extra))
        _assert_unchanged(target, before)
        return
    set_peft_model_state_dict(target, dict(state, **extra))
    base = target.get_base_model()
    assert torch.equal(base.model.embed_tokens.base_layer.weight, extra[keys[0]])
    assert torch.equal(base.lm_head.base_layer.weight, extra[keys[1]])


# === 3. one save = one pair =========================================================================================
def test_save_keeps_other_files_and_removes_temporaries_a_killed_save_left(tmp_path):
    folder = tmp_path / "checkpoint-10"
    (folder / "tokenizer").mkdir(parents=True)
    others = {"optimizer.pt": b"opt", "trainer_state.json": b"{}", "tokenizer/tokenizer.json": b"{}",
              ".notes.txt.1234.tmp": b"not ours"}
    for name, data in others.items():
        (folder / name).write_bytes(data)
    stale = [".adapter_model.safetensors.abc123.tmp", ".adapter_config.json.def456.tmp", ".adapter_model.bin.x.tmp"]
    for name in stale:
        (folder / name).write_bytes(b"partial")
    model = _valued(1)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(folder)
    assert all((folder / name).read_bytes() == data for name, data in others.items())
    assert _temporaries(folder) == [".notes.txt.1234.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "adapter_config.json", WEIGHTS, "optimizer.pt", "trainer_state.json", "tokenizer", "second",
         ".notes.txt.1234.tmp"])
    assert sorted(p.name for p in (folder / "second").iterdir()) == ["adapter_config.json", WEIGHTS]


def test_config_that_is_not_the_weights_own_is_refused_descriptive_fields_aside(tmp_path):
    _valued(2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "somewhere/else"  # edited by hand: does not change the adapter
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, indent=4))
    assert _read_pair(tmp_path) == (2, 2)
    config["lora_alpha"] = 1  # the config of another save (or an edit that changes the adapter)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = _tiny_base()
    with pytest.raises(ValueError, match="is not the config .* was saved with"):
        PeftModel.from_pretrained(base, tmp_path)
    assert type(base[0]) is nn.Linear
    with pytest.warns(UserWarning, match="is not the config"):  # the user asked to load what fits
        PeftModel.from_pretrained(_tiny_base(), tmp_path, ignore_mismatched_sizes=True)
    explicit = PeftModel.from_pretrained(_tiny_base(), tmp_path, config=LoraConfig(r=2, lora_alpha=2,
                                                                                   target_modules=["0"]))
    assert explicit.peft_config["default"].lora_alpha == 2


def test_a_bin_save_replaces_an_older_safetensors(tmp_path):
    """Before: the older adapter_model.safetensors stayed, and loaders (preferring it) read it beside the new
    config."""
    _valued(1).save_pretrained(tmp_path)
    _valued(2).save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    assert _read_pair(tmp_path) == (2, 2)
    _valued(3).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS]


@needs_fork
def test_kill_9_between_weights_and_config_is_refused_not_loaded_as_a_mix(tmp_path):
    """Before: new weights beside the old config loaded silently (alpha of one save, weights of the other)."""
    folder = tmp_path / "adapter"
    _valued(1).save_pretrained(folder)
    child = _Child(folder, "between", 2, 1)
    try:
        child.said("ready")
        child.said("between")
    finally:
        child.kill()
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 1
    assert load_peft_weights(folder)["base_model.model.0.lora_A.weight"][0, 0] == 2  # the mix is on disk
    base = _tiny_base()
    with pytest.raises(ValueError, match="is not the config .* was saved with"):
        PeftModel.from_pretrained(base, folder)
    assert type(base[0]) is nn.Linear and not hasattr(base, "peft_config")
    model = _valued(5)
    before = _state(model)
    with pytest.raises(ValueError, match="is not the config"):
        model.load_adapter(folder, "default")
    _assert_unchanged(model, before)
    _valued(3).save_pretrained(folder)  # the next save makes a whole pair again
    assert _read_pair(folder) == (3, 3)


@needs_fork
def test_kill_9_while_writing_the_weights_keeps_the_old_pair_and_the_next_save_cleans_up(tmp_path):
    folder = tmp_path / "adapter"
    _valued(1).save_pretrained(folder)
    child = _Child(folder, "tmp", 2, 1)
    try:
        child.said("ready")
        child.said("tmp")
    finally:
        child.kill()
    assert _read_pair(folder) == (1, 1)
    assert len(_temporaries(folder)) == 1
    _valued(3).save_pretrained(folder)
    assert _temporaries(folder) == [] and _read_pair(folder) == (3, 3)


@needs_fork
def test_concurrent_savers_and_a_reader_never_see_a_mixed_pair(tmp_path):
    """Two processes save different adapters (alpha v, weights v) into one folder, each pausing 10 ms between
    its two files, while this process loads the folder in a loop."""
    folder, go = tmp_path / "adapter", tmp_path / "go"
    _valued(1).save_pretrained(folder)
    savers = [_Child(folder, "slow", first, 30, go) for first in (100, 200)]
    reads, mixed, errors = 0, [], []
    try:
        for saver in savers:
            saver.said("ready")
        go.touch()
        saving = list(savers)
        while saving:
            try:
                alpha, value = _read_pair(folder)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            reads += 1
            if alpha != value:
                mixed.append((alpha, value))
            for saver in [s for s in saving if s.conn.poll()]:
                saver.said("done")
                saving.remove(saver)
    finally:
        _kill(savers)
    assert not mixed and not errors
    assert reads >= 5
    alpha, value = _read_pair(folder)
    assert alpha == value and alpha in (129, 229) and _temporaries(folder) == []


@needs_fork
def test_kill_9_at_random_points_never_leaves_a_pair_that_loads_mixed(tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    folders = [tmp_path / f"adapter{i}" for i in range(3)]
    for folder in folders:
        _valued(1).save_pretrained(folder)
    savers = [_Child(folder, "slow", 100 * (i + 1), 10**6) for i, folder in enumerate(folders)]
    try:
        for saver in savers:
            saver.said("ready")
        for saver in savers:
            time.sleep(rng.uniform(0.0, 0.2))
            saver.kill()
    finally:
        _kill(savers)
    for folder in folders:
        try:
            alpha, value = _read_pair(folder)
        except ValueError as exc:
            assert "is not the config" in str(exc), f"seed {seed}: {exc}"
        else:
            assert alpha == value, f"seed {seed}: a mixed pair loaded from {folder}"
        _valued(7).save_pretrained(folder)
        assert _read_pair(folder) == (7, 7) and _temporaries(folder) == []


# === 4. values and dtypes ===========================================================================================
KEY = "base_model.model.lin1.lora_B.weight"
BAD_VALUES = {
    "nan": (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "holds 2 NaN or infinite values"),
    "inf": (lambda t: t.index_fill(0, torch.tensor([0]), float("-inf")), "holds 2 NaN or infinite values"),
    "int": (lambda t: (t * 100).to(torch.int64), "dtype torch.int64"),
    "bool": (lambda t: t > 0, "dtype torch.bool"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_non_finite_or_non_float_weights_are_refused_by_name_model_unchanged(tmp_path, case):
    """Before: NaN/inf loaded silently, int/bool tensors were cast silently."""
    change, message = BAD_VALUES[case]
    model = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    randomize_adapter(model, seed=1)
    model.save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda w: w.update({KEY: change(w[KEY])}))
    pattern = re.escape(KEY) + ".*" + re.escape(message)
    base = SPEC.build()
    before = _state(base)
    with pytest.raises(ValueError, match=pattern):
        PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)
    target = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    before = _state(target)
    for name in ("default", "other"):
        with pytest.raises(ValueError, match=pattern):
            target.load_adapter(tmp_path, name)
    _assert_unchanged(target, before)


def test_values_the_models_dtype_cannot_hold_are_refused():
    model = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"]))
    state = get_peft_model_state_dict(model)
    state[KEY] = torch.full_like(state[KEY], 1e6)  # finite in float32, inf in float16
    target = get_peft_model(SPEC.build(), LoraConfig(r=2, target_modules=["lin1"])).half()
    before = _state(target)
    with pytest.raises(ValueError, match=re.escape(KEY) + ".*too large for the model's torch.float16"):
        set_peft_model_state_dict(target, state)
    _assert_unchanged(target, before)
