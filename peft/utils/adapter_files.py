"""An adapter folder's two files: reading the weights (`load_peft_weights`), and saving / loading
`adapter_config.json` with its weights as one pair (`save_adapter_folder`, `load_adapter_pair`). Re-exported from
`peft.utils.save_and_load`, upstream's import path."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import torch

from .constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .hub import is_offline, resolve_adapter_file
from .io import atomic_write, folder_lock, remove_stale_temporaries


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
