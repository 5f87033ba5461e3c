"""Adapter state dicts in upstream's file format, and reading and writing an adapter folder's two files.

In memory a key reads `<path>.lora_A.<adapter>.weight`; on disk the adapter name is dropped:
`<path>.lora_A.weight`, `<path>.lora_B.bias` (`lora_bias`), `<path>.lora_embedding_A`, `<path>.lora_magnitude_vector`
(DoRA; in memory `<path>.lora_magnitude_vector.<adapter>.weight`), and `<path>.<param>` for `modules_to_save`
copies. Wrappers (`AuxiliaryTrainingWrapper`) give their own map, e.g. trainable tokens:
`<path>.token_adapter.trainable_tokens_delta` on disk, `<path>.token_adapter.trainable_tokens_delta.<adapter>`.

Loading accepts only the adapter's own tensors (plus the few extras `_optional_load_keys` lists) and only finite
floating-point values; saving and loading treat `adapter_config.json` and the weights as one pair (see the
"one save = one pair" section below).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .hub import is_offline, resolve_adapter_file
from .io import atomic_write, folder_lock, remove_stale_temporaries
from .other import AuxiliaryTrainingWrapper

_LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _adapter_key_to_file_key(key: str, adapter_name: str) -> Optional[str]:
    """The on-disk key for in-memory `key` if it belongs to adapter `adapter_name`, else None."""
    dora_marker = f".lora_magnitude_vector.{adapter_name}.weight"  # DoRA: upstream drops ".weight" too
    if key.endswith(dora_marker):
        return key[: -len(dora_marker)] + ".lora_magnitude_vector"
    for container in _LORA_CONTAINERS + ("modules_to_save",):
        marker = f".{container}.{adapter_name}"
        if key.endswith(marker):
            return key[: -len(marker)] + f".{container}"
        if marker + "." in key:
            replacement = "." if container == "modules_to_save" else f".{container}."
            return key.replace(marker + ".", replacement, 1)
    return None


def _wrapper_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """In-memory key -> on-disk key of every tensor a wrapper saves for `adapter_name`, from the wrappers'
    `adapter_state_dict_load_map` (on-disk key -> in-memory key, both relative to the wrapper)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            name = name.replace("_fsdp_wrapped_module.", "")  # FSDP (v1) module names; its state dict keys lack it
            prefix = f"{name}." if name else ""
            for file_key, key in module.adapter_state_dict_load_map(adapter_name).items():
                out[prefix + key] = prefix + file_key
    return out


def _bias_keys(model: nn.Module, state_dict: dict, bias: str) -> list[str]:
    if bias == "none":
        return []
    if bias == "all":
        return [k for k in state_dict if k.endswith("bias") and "lora_" not in k and "original_module" not in k
                and "modules_to_save" not in k]
    from ..tuners.tuners_utils import BaseTunerLayer

    keys = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and getattr(module.get_base_layer(), "bias", None) is not None:
            base_path = name.replace("_fsdp_wrapped_module.", "") + ".base_layer.bias"  # FSDP: keys lack it
            keys.extend(k for k in state_dict if k.endswith(base_path) or k == base_path)
    return keys


def get_peft_model_state_dict(
    model: nn.Module, state_dict: Optional[dict] = None, adapter_name: str = "default", **kwargs
) -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name` under their on-disk keys (upstream's format)."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; available adapters: {sorted(model.peft_config)}.")
    config = model.peft_config[adapter_name]
    if state_dict is None:
        state_dict = model.state_dict()
    out = {}
    wrapped = _wrapper_keys(model, adapter_name)
    for key, value in state_dict.items():
        file_key = _adapter_key_to_file_key(key, adapter_name) or wrapped.get(key)
        if file_key is not None:
            out[file_key] = value
    for key in _bias_keys(model, state_dict, getattr(config, "bias", "none")):
        out[key] = state_dict[key]  # upstream keeps `.base_layer.` in the key of an adapted layer's bias
    return out


def _adapter_load_keys(model: nn.Module, adapter_name: str, model_keys) -> dict[str, str]:
    """On-disk key -> model key of the adapter's own tensors (LoRA factors, `modules_to_save` copies, wrappers')."""
    wrapped = _wrapper_keys(model, adapter_name)
    out = {}
    for key in model_keys:
        file_key = _adapter_key_to_file_key(key, adapter_name) or wrapped.get(key)
        if file_key is not None:
            out[file_key] = key
    return out


def _optional_load_keys(model: nn.Module, adapter_name: str, own: dict, model_keys) -> dict[str, str]:
    """On-disk key -> model key of what else a file of this adapter may hold (nothing else ever loads):

    - upstream's repeat of a `modules_to_save` copy's bias as `<module>.modules_to_save.<param>` (bias="all");
    - the model's biases outside the adapter containers, under their own key (`<layer>.base_layer.bias` for an
      adapted layer) or, for an adapted layer, `<layer>.bias` (older files of this fork). A file holding a bias says
      it was trained (upstream saves the biases of `bias="all"` / `"lora_only"`), so loading it reproduces the saved
      model even when this config has `bias="none"`; `set_peft_model_state_dict` warns about those
      (`_untrained_biases`);
    - the base weights of an input / output embedding the adapter targets (upstream's `save_embedding_layers`).
    """
    marker = f".modules_to_save.{adapter_name}."
    out = {key.replace(marker, ".modules_to_save.", 1): key for key in own.values() if marker in key}
    for key in _trained_bias_keys(model, model_keys, "all"):
        out[key] = key
        if key.endswith(".base_layer.bias"):
            out.setdefault(key[: -len(".base_layer.bias")] + ".bias", key)
    for key in _targeted_embedding_keys(model, adapter_name, model_keys):
        out[key] = key
    return out


def _in_adapter_container(key: str) -> bool:
    return any(part in _LORA_CONTAINERS or part == "modules_to_save" for part in key.split("."))


def _trained_bias_keys(model: nn.Module, model_keys, bias: str) -> list[str]:
    """`bias="all"`: every bias outside the adapter containers (upstream also writes `original_module` biases);
    `"lora_only"`: the base biases of the adapted layers; `"none"`: none."""
    if bias == "all":  # "bias", and `nn.MultiheadAttention`'s in_proj_bias / bias_k / bias_v
        return [k for k in model_keys if "bias" in k.split(".")[-1] and not _in_adapter_container(k)]
    if bias != "lora_only":
        return []
    from ..tuners.tuners_utils import BaseTunerLayer

    keys = (f"{name}.base_layer.bias" if name else "base_layer.bias"
            for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))
    return [k for k in keys if k in model_keys]


def _untrained_biases(model: nn.Module, adapter_name: str, loaded_keys, model_keys) -> list[str]:
    """The loaded bias keys that adapter `adapter_name`'s `bias` setting does not train."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    trained = set(_trained_bias_keys(model, model_keys, getattr(config, "bias", "none")))
    biases = set(_trained_bias_keys(model, model_keys, "all"))
    return sorted(k for k in loaded_keys if k in biases and k not in trained)


def _targeted_embedding_keys(model: nn.Module, adapter_name: str, model_keys) -> list[str]:
    """Keys of the base layer of a transformers model's input or output embedding when adapter `adapter_name`
    adapts it: what upstream 0.21 writes with `save_embedding_layers` (on by default when `target_modules` names
    `embed_tokens` / `lm_head`). A resized but untargeted embedding (upstream's other case) is not accepted."""
    from ..tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(base, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(layer, BaseTunerLayer) and adapter_name in layer._all_available_adapter_names():
            layers.append(layer)
    keys = []
    for name, module in model.named_modules():
        if any(module is layer for layer in layers):
            prefix = f"{name}.base_layer." if name else "base_layer."
            keys.extend(k for k in model_keys if k.startswith(prefix) and "." not in k[len(prefix):])
    return keys


def _stage(file_key: str, tensor, target: torch.Tensor) -> tuple[Optional[torch.Tensor], str]:
    """`tensor` on `target`'s device and in its dtype, or None and why it cannot be loaded: not a floating-point
    tensor (an integer or boolean one would be cast silently), NaN / infinite values, or values the cast overflows."""
    if not isinstance(tensor, torch.Tensor):
        return None, f"{file_key} is a {type(tensor).__name__}, not a tensor"
    if not tensor.is_floating_point():
        return None, f"{file_key} has dtype {tensor.dtype}; adapter weights must be floating-point"
    non_finite = int((~torch.isfinite(tensor)).sum())
    if non_finite:
        return None, f"{file_key} holds {non_finite} NaN or infinite values (of {tensor.numel()})"
    staged = tensor.to(device=target.device, dtype=target.dtype)
    if not bool(torch.isfinite(staged).all()):
        return None, f"{file_key} holds values too large for the model's {target.dtype}"
    return staged, ""


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict, adapter_name: str = "default", ignore_mismatched_sizes=False,
    unpaired: Optional[str] = None, **kwargs,
):
    """Copy on-disk-format tensors into adapter `adapter_name`. Only tensors that belong to the adapter load (see
    `_optional_load_keys`); any other key, a non-floating-point tensor, a NaN or an infinity is an error. Every key,
    shape and value is checked before any copy, so a failed call leaves the model unchanged. `unpaired` (from
    `load_adapter_pair`: the weights were saved with another config) is an error too, checked last so that a
    mismatch it explains is named first (a warning with `ignore_mismatched_sizes`). Returns torch's
    `_IncompatibleKeys`-like result."""
    model_state = model.state_dict()
    own = _adapter_load_keys(model, adapter_name, model_state.keys())
    loadable = {**_optional_load_keys(model, adapter_name, own, model_state.keys()), **own}
    targets, unexpected, mismatched, refused, skipped = {}, [], [], [], set()
    for file_key, tensor in peft_model_state_dict.items():
        key = loadable.get(file_key)
        if key in targets or key in skipped:  # an alias of a key already read (upstream's duplicates)
            continue
        if key is None:
            unexpected.append(file_key)
        elif isinstance(tensor, torch.Tensor) and tuple(model_state[key].shape) != tuple(tensor.shape):
            mismatched.append(f"{file_key}: file {tuple(tensor.shape)} vs model {tuple(model_state[key].shape)}")
            skipped.add(key)
        else:
            targets[key], problem = _stage(file_key, tensor, model_state[key])
            if problem:
                refused.append(problem)
    missing = sorted(k for k in own.values() if k not in targets and k not in skipped)
    error = _load_error(adapter_name, model_state, unexpected, mismatched, refused, missing, ignore_mismatched_sizes)
    if error:
        raise ValueError(error + (f" Note: {unpaired}" if unpaired else ""))
    if mismatched:
        warnings.warn(f"Skipped tensors of another shape loading adapter {adapter_name!r}: " + "; ".join(mismatched))
    if unpaired and ignore_mismatched_sizes:
        warnings.warn(f"{unpaired} Loading what fits, as ignore_mismatched_sizes=True.")
    elif unpaired:
        raise ValueError(f"{unpaired} Save the adapter again, or pass the config these weights were saved with "
                         "(PeftModel.from_pretrained(..., config=...)).")
    untrained = _untrained_biases(model, adapter_name, targets, model_state.keys())
    if untrained:
        warnings.warn(f"Loading {len(untrained)} biases into adapter {adapter_name!r} whose `bias` setting does not "
                      f"train them (the file was saved with trained biases): {untrained[:5]}.")
    with torch.no_grad():
        for key, tensor in targets.items():
            model_state[key].copy_(tensor)
    return torch.nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _load_error(adapter_name, model_state, unexpected, mismatched, refused, missing, ignore_mismatched_sizes):
    """The message of the first problem that stops a load, or None."""
    if refused:
        return f"Cannot load adapter {adapter_name!r}: " + "; ".join(refused) + "."
    if mismatched and not ignore_mismatched_sizes:
        return f"Shape mismatch loading adapter {adapter_name!r}: " + "; ".join(mismatched) + "."
    if unexpected:
        base = [k for k in unexpected if k in model_state]
        detail = f" ({len(base)} name base-model tensors this adapter does not train: {base[:5]})" if base else ""
        return (
            f"Adapter weights do not fit adapter {adapter_name!r} of this model: {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}{detail}. An adapter file may hold only the adapter's LoRA factors, its modules_to_save "
            "copies, the model's biases, its trainable-token rows, and the base weights of an "
            "embedding layer it adapts."
        )
    if missing:
        return (f"Adapter weights do not fit adapter {adapter_name!r} of this model: {len(missing)} missing keys "
                f"{missing[:5]}.")
    return None


def load_peft_weights(model_id: str, device: Optional[str] = None, **hub_kwargs) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors` (preferred) or `adapter_model.bin` (loaded with `weights_only=True`)."""
    return _read_weights(model_id, device, hub_kwargs)[1]


def _read_weights(model_id: str, device: Optional[str], hub_kwargs: dict) -> tuple[str, dict[str, torch.Tensor]]:
    hub_kwargs = dict(hub_kwargs)
    subfolder, revision = hub_kwargs.pop("subfolder", None), hub_kwargs.pop("revision", None)
    path = resolve_adapter_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, revision, required=False, **hub_kwargs)
    use_safetensors = path is not None
    if path is None:
        path = resolve_adapter_file(model_id, WEIGHTS_NAME, subfolder, revision, required=False, **hub_kwargs)
    if path is None:
        where = " (HF_HUB_OFFLINE=1: only local folders and the hub cache were searched)" if is_offline() else ""
        raise FileNotFoundError(
            f"No adapter weights in {os.fspath(model_id)!r}: expected {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}"
            f"{where}."
        )
    device = device or "cpu"
    try:
        if use_safetensors:
            from safetensors.torch import load_file

            return path, load_file(path, device=device)
        return path, torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # corrupt, truncated or unsafe pickles all land here
        raise ValueError(f"Cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc


# --- one save = one pair --------------------------------------------------------------------------------------------
# A folder's `adapter_config.json` and weights are two files, each replaced atomically. Savers hold an exclusive
# `folder_lock` and readers a shared one, so within this package a reader never interleaves with a save. A save
# killed between the two files leaves new weights beside the old config; the weights therefore record a digest of
# the config they were saved with (safetensors metadata, which upstream ignores), and a reader refuses a pair whose
# digests differ. See docs/adapter_format.md.
_CONFIG_RECORD = "peft_config_sha256"
# Fields a person or a hub tool may edit without changing what the weights mean; left out of the digest.
_UNPAIRED_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"})
_PAIR_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)


def config_digest(config_json: dict) -> str:
    """sha256 of the JSON form of a config (as written to `adapter_config.json`), descriptive fields left out."""
    kept = {k: v for k, v in config_json.items() if k not in _UNPAIRED_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def save_adapter_folder(
    folder: str, weights: dict, config, safe_serialization: bool = True,
    write_config: Optional[Callable[[str], None]] = None,
) -> None:
    """Write one adapter into `folder` as one save: weights (recording the config's digest), then the config
    (`write_config(folder)`, default `config.save_pretrained`), then remove the other weights format's file, all
    under the folder's exclusive lock; first remove temporaries a killed save left. Other files are untouched."""
    os.makedirs(folder, exist_ok=True)
    record = config_digest(json.loads(json.dumps(config.to_dict())))  # keys and values as the JSON file has them
    with folder_lock(folder):
        remove_stale_temporaries(folder, _PAIR_FILES)
        save_adapter_weights(weights, folder, safe_serialization=safe_serialization, config_record=record)
        (write_config or config.save_pretrained)(folder)
        stale = os.path.join(folder, WEIGHTS_NAME if safe_serialization else SAFETENSORS_WEIGHTS_NAME)
        if os.path.exists(stale):  # else a reader would prefer an older adapter_model.safetensors
            os.remove(stale)


def load_adapter_pair(
    model_id: str, device: Optional[str] = None, check_config: Optional[Callable] = None, **hub_kwargs
):
    """`(config, weights, unpaired)` of the adapter in `model_id` (folder or hub id), read under the folder's shared
    lock; `check_config(config)` runs before the weights are read. `unpaired` is None, or a message when the weights
    record the digest of another config than `adapter_config.json` (pass it to `set_peft_model_state_dict`)."""
    from ..config import PeftConfig

    rest = {k: v for k, v in hub_kwargs.items() if k not in ("subfolder", "revision")}
    config_path = resolve_adapter_file(
        model_id, CONFIG_NAME, hub_kwargs.get("subfolder"), hub_kwargs.get("revision"), **rest
    )
    with folder_lock(os.path.dirname(config_path), shared=True):
        with open(config_path, "rb") as f:
            raw = f.read()
        config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
        if check_config is not None:
            check_config(config)
        weights_path, weights = _read_weights(model_id, device, hub_kwargs)
        record = _config_record(weights_path)
    unpaired = None
    if record is not None and record != config_digest(json.loads(raw.decode("utf-8"))):
        unpaired = (f"{config_path!r} is not the config {weights_path!r} was saved with (a save killed between its two "
                    "files, or a config edited by hand in a field that changes the adapter).")
    return config, weights, unpaired


def _config_record(weights_path: str) -> Optional[str]:
    if not weights_path.endswith(".safetensors"):
        return None  # a torch.save file has no place for it (a foreign key would reach upstream's loader)
    from safetensors import safe_open

    with safe_open(weights_path, framework="pt") as f:
        return (f.metadata() or {}).get(_CONFIG_RECORD)


def save_adapter_weights(
    state_dict: dict, folder: str, safe_serialization: bool = True, config_record: Optional[str] = None
) -> str:
    """Write weights under a temporary name and rename; returns the final path. `config_record` (the digest of the
    config saved beside them, see `save_adapter_folder`) goes into the safetensors metadata."""
    state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        metadata = {"format": "pt", **({_CONFIG_RECORD: config_record} if config_record else {})}
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        def write(tmp: str) -> None:
            save_file(_unshare(state_dict), tmp, metadata=metadata)
            _sort_metadata(tmp)

        atomic_write(path, write)
    else:
        path = os.path.join(folder, WEIGHTS_NAME)
        atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
    return path


def _unshare(state_dict: dict) -> dict:
    """safetensors refuses tensors that share storage: clone the repeats."""
    seen, out = set(), {}
    for key, value in state_dict.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        out[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return out


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors header with its metadata keys sorted. safetensors writes them in hash-map order, which
    changes from process to process, so the same adapter saved twice would not give the same bytes. Reordering the
    keys of one JSON object keeps the header's length, so only the header bytes are rewritten, in place."""
    import json
    import struct

    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        text = raw.decode("utf-8")
        body = text.rstrip(" ")
        header = json.loads(body)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)
        if len(new.encode("utf-8")) != len(body.encode("utf-8")):  # another serializer: leave its header alone
            return
        f.seek(8)
        f.write((new + text[len(body):]).encode("utf-8"))
