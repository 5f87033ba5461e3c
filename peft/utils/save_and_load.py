"""Adapter state dicts in upstream's file format, and reading and writing an adapter folder's two files.

In memory a key names its adapter, `<path>.<container>.<adapter>.weight`; on disk the adapter name is dropped,
`<path>.<container>.weight`. Which keys an adapter owns, and their on-disk names, come from the modules that hold
them (`adapter_state_dict_load_map` of tuner layers, tuner models and auxiliary wrappers such as `modules_to_save`
copies, saved as `<path>.<param>`, or trainable tokens), so this module knows no tuner type's key names.

Loading accepts only the adapter's own tensors (plus the few extras `_optional_load_keys` lists) and only finite
floating-point values; saving and loading treat `adapter_config.json` and the weights as one pair (see the
"one save = one pair" section below).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .adapter_files import (
    config_digest,
    load_adapter_pair,
    load_peft_weights,
    save_adapter_folder,
    save_adapter_weights,
)  # noqa: F401  (re-exported: the folder I/O lives in adapter_files.py)
from .other import AuxiliaryTrainingWrapper


def _file_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """In-memory key -> on-disk key of every tensor adapter `adapter_name` saves. Each module that owns adapter state
    says which keys are its own (`adapter_state_dict_load_map`: on-disk -> in-memory, relative to the module): tuner
    layers (from their `adapter_layer_names` containers), auxiliary wrappers (`modules_to_save` copies, trainable
    tokens) and the tuner model itself (state shared by its layers). Nothing here knows a tuner type's key names."""
    from ..tuners.tuner_layer import BaseTunerLayer
    from ..tuners.tuners_utils import BaseTuner

    wrappers, layers = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            out = wrappers
        elif isinstance(module, (BaseTunerLayer, BaseTuner)):
            out = layers  # a tuner layer inside a `modules_to_save` copy keeps its own keys (layers win)
        else:
            continue
        name = name.replace("_fsdp_wrapped_module.", "")  # FSDP (v1) module names; its state dict keys lack it
        prefix = f"{name}." if name else ""
        for file_key, key in module.adapter_state_dict_load_map(adapter_name).items():
            out[prefix + key] = prefix + file_key
    return {**wrappers, **layers}


def _adapter_state_prefixes(model: nn.Module) -> set[str]:
    """Key prefixes of every adapter's own state (tuner containers, `modules_to_save` copies and wrappers)."""
    from ..tuners.target_matching import tuner_state_dict_key_prefixes

    return tuner_state_dict_key_prefixes(model)


def _in_adapter_state(key: str, prefixes: set[str]) -> bool:
    from ..tuners.target_matching import key_under_prefixes

    return "modules_to_save" in key.split(".") or key_under_prefixes(key, prefixes)


def _bias_keys(model: nn.Module, state_dict: dict, bias: str) -> list[str]:
    if bias == "none":
        return []
    if bias == "all":
        prefixes = _adapter_state_prefixes(model)
        return [k for k in state_dict if k.endswith("bias") and "original_module" not in k.split(".")
                and not _in_adapter_state(k, prefixes)]
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
    file_keys = _file_keys(model, adapter_name)
    out = {file_keys[key]: value for key, value in state_dict.items() if key in file_keys}
    for key in _bias_keys(model, state_dict, getattr(config, "bias", "none")):
        out[key] = state_dict[key]  # upstream keeps `.base_layer.` in the key of an adapted layer's bias
    return out


def _adapter_load_keys(model: nn.Module, adapter_name: str, model_keys) -> dict[str, str]:
    """On-disk key -> model key of the adapter's own tensors (LoRA factors, `modules_to_save` copies, wrappers')."""
    model_keys = set(model_keys)
    return {file_key: key for key, file_key in _file_keys(model, adapter_name).items() if key in model_keys}


def _optional_load_keys(model: nn.Module, adapter_name: str, own: dict, model_keys) -> dict[str, str]:
    """On-disk key -> model key of what else a file of this adapter may hold (nothing else ever loads):

    - upstream's repeat of a `modules_to_save` copy's bias as `<module>.modules_to_save.<param>` (bias="all");
    - the model's biases outside the adapter containers, under their own key (`<layer>.base_layer.bias` for an
      adapted layer) or, for an adapted layer, `<layer>.bias` (older files of this fork). A file holding a bias says
      it was trained (upstream saves the biases of `bias="all"` and `"<method>_only"`), so loading it reproduces the
      saved model even when this config has `bias="none"`; `set_peft_model_state_dict` warns about those
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


def _trained_bias_keys(model: nn.Module, model_keys, bias: str) -> list[str]:
    """`bias="all"`: every bias outside the adapter containers (upstream also writes `original_module` biases);
    `"<method>_only"` (one per tuner type, named after it): the base biases of the adapted layers; `"none"`: none."""
    if bias == "all":  # "bias", and `nn.MultiheadAttention`'s in_proj_bias / bias_k / bias_v
        prefixes = _adapter_state_prefixes(model)
        return [k for k in model_keys if "bias" in k.split(".")[-1] and not _in_adapter_state(k, prefixes)]
    if not str(bias).endswith("_only"):
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


__all__ = [
    "config_digest",
    "get_peft_model_state_dict",
    "load_adapter_pair",
    "load_peft_weights",
    "save_adapter_folder",
    "save_adapter_weights",
    "set_peft_model_state_dict",
]
