"""Adapter state dicts in upstream's file format, and reading adapter weight files.

In memory a key reads `<path>.lora_A.<adapter>.weight`; on disk the adapter name is dropped:
`<path>.lora_A.weight`, `<path>.lora_embedding_A`, and `<path>.<param>` for `modules_to_save` copies. Wrappers
(`AuxiliaryTrainingWrapper`) give their own map, e.g. trainable tokens:
`<path>.token_adapter.trainable_tokens_delta` on disk, `<path>.token_adapter.trainable_tokens_delta.<adapter>`.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn

from .constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .hub import is_offline, resolve_adapter_file
from .io import atomic_write
from .other import AuxiliaryTrainingWrapper

_LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _adapter_key_to_file_key(key: str, adapter_name: str) -> Optional[str]:
    """The on-disk key for in-memory `key` if it belongs to adapter `adapter_name`, else None."""
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
            base_path = name + ".base_layer.bias"
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


def _file_key_to_model_key(file_key: str, adapter_name: str, reverse: dict, model_keys: set) -> Optional[str]:
    """Where an on-disk key goes in the model's state dict (None when nothing there takes it).

    Besides adapter tensors: a bias under `<path>.bias` (older files of this fork) goes to `<path>.base_layer.bias`;
    a key naming a model tensor verbatim loads into it, as upstream does (its `save_embedding_layers` stores
    `<embedding>.base_layer.weight`; `bias="all"` stores `<module>.base_layer.bias` and `original_module` biases);
    upstream's redundant `<module>.modules_to_save.<param>` (bias="all") is read as `<module>.<param>`.
    """
    if file_key in reverse:
        return reverse[file_key]
    if file_key.endswith(".bias"):
        base_bias = file_key[: -len(".bias")] + ".base_layer.bias"
        if base_bias in model_keys:
            return base_bias
    if file_key in model_keys:
        return file_key
    alias = file_key.replace(".modules_to_save.", ".", 1)
    return reverse.get(alias) if alias != file_key else None


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict, adapter_name: str = "default", ignore_mismatched_sizes=False,
    **kwargs,
):
    """Copy on-disk-format tensors into adapter `adapter_name`. Every key and shape is checked before any copy,
    so a failed call leaves the model unchanged. Returns torch's `_IncompatibleKeys`-like result."""
    model_state = model.state_dict()
    model_keys = set(model_state)
    reverse = {}
    wrapped = _wrapper_keys(model, adapter_name)
    for key in model_keys:
        file_key = _adapter_key_to_file_key(key, adapter_name) or wrapped.get(key)
        if file_key is not None:
            reverse[file_key] = key
    targets, unexpected, mismatched, skipped = {}, [], [], set()
    for file_key, tensor in peft_model_state_dict.items():
        key = _file_key_to_model_key(file_key, adapter_name, reverse, model_keys)
        if key in targets or key in skipped:  # an alias of a key already read (upstream's duplicates)
            continue
        if key is None:
            unexpected.append(file_key)
        elif tuple(model_state[key].shape) != tuple(tensor.shape):
            mismatched.append(f"{file_key}: file {tuple(tensor.shape)} vs model {tuple(model_state[key].shape)}")
            skipped.add(key)
        else:
            targets[key] = tensor
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(f"Shape mismatch loading adapter {adapter_name!r}: " + "; ".join(mismatched))
    if mismatched:
        warnings.warn(f"Skipped tensors of another shape loading adapter {adapter_name!r}: " + "; ".join(mismatched))
    missing = sorted(k for k in reverse.values() if k not in targets and k not in skipped)
    if unexpected or missing:
        raise ValueError(
            f"Adapter weights do not fit adapter {adapter_name!r} of this model: "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(missing)} missing keys {missing[:5]}."
        )
    with torch.no_grad():
        for key, tensor in targets.items():
            model_state[key].copy_(tensor.to(device=model_state[key].device, dtype=model_state[key].dtype))
    return torch.nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def load_peft_weights(model_id: str, device: Optional[str] = None, **hub_kwargs) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors` (preferred) or `adapter_model.bin` (loaded with `weights_only=True`)."""
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

            return load_file(path, device=device)
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # corrupt, truncated or unsafe pickles all land here
        raise ValueError(f"Cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc


def save_adapter_weights(state_dict: dict, folder: str, safe_serialization: bool = True) -> str:
    """Write weights under a temporary name and rename; returns the final path."""
    state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        atomic_write(path, lambda tmp: save_file(_unshare(state_dict), tmp, metadata={"format": "pt"}))
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


