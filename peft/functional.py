"""Adapter management on a plain model, without a `PeftModel` around it.

This is the surface integrations build on (transformers' `PeftAdapterMixin`: `add_adapter`, `load_adapter`,
`delete_adapter`; diffusers): inject an adapter into a model, switch, freeze, cast and delete adapters, and read or
write an adapter's state dict. Each function works on the tuner layers and auxiliary wrappers it finds in the
model, so it applies to any tuner type.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .mapping import inject_adapter_in_model
from .tuners.target_matching import _inside_adapter_machinery
from .tuners.trainable_tokens.layer import TrainableTokensLayer
from .tuners.tuners_utils import BaseTunerLayer
from .utils.other import AuxiliaryTrainingWrapper, get_submodules
from .utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict

_FLOAT_LOW = (torch.float16, torch.bfloat16)


def _names(adapter_names: Union[str, list[str]]) -> list[str]:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"adapter names must be non-empty strings, got {adapter_names!r}.")
    return names


def _adapter_modules(model: nn.Module, layer_cls: type = BaseTunerLayer, prefix: Optional[str] = None):
    """(name, module) for each tuner layer and auxiliary wrapper, outermost only."""
    for key, module in model.named_modules():
        if _inside_adapter_machinery(key) or (prefix and prefix in key):
            continue
        if isinstance(module, (layer_cls, AuxiliaryTrainingWrapper)):
            yield key, module


def _held_adapters(module: nn.Module) -> list[str]:
    if isinstance(module, BaseTunerLayer):
        return module._all_available_adapter_names()
    held = getattr(module, "adapter_names", None)
    if callable(held):
        return list(held())
    return list(getattr(module, "modules_to_save", {}).keys())


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module


def delete_adapter(
    model: nn.Module, adapter_name: str, prefix: Optional[str] = None, layer_cls: type = BaseTunerLayer
) -> Optional[list[str]]:
    """Remove adapter `adapter_name` from every tuner layer and auxiliary wrapper of `model`. A layer left with
    no adapter gives its original module back, so deleting the last adapter restores the plain model. The
    model's `peft_config` is not touched (the caller owns it). Returns the adapters still active after the
    deletion (None when no adapter is left)."""
    modules = list(_adapter_modules(model, layer_cls, prefix))
    if not any(adapter_name in _held_adapters(m) for _, m in modules):
        held = sorted({n for _, m in modules for n in _held_adapters(m)})
        raise ValueError(f"Adapter {adapter_name!r} is not in this model; adapters found: {held}.")
    remaining_active: Optional[list[str]] = None
    for key, module in modules:
        module.delete_adapter(adapter_name)
        if not _held_adapters(module):
            parent, _, attr = get_submodules(model, key)
            setattr(parent, attr, _unwrapped(module))
        elif remaining_active is None and isinstance(module, BaseTunerLayer):
            remaining_active = module.active_adapters
    return remaining_active


def set_adapter(
    model: nn.Module, adapter_name: Union[str, list[str]], inference_mode: bool = False,
    layer_cls: type = BaseTunerLayer,
) -> None:
    """Make the named adapter(s) active in every tuner layer and wrapper of `model` (trainable, or frozen with
    `inference_mode=True`); the others are frozen."""
    names = _names(adapter_name)
    modules = [m for _, m in _adapter_modules(model, layer_cls)]
    unknown = [n for n in names if not any(n in _held_adapters(m) for m in modules)]
    if unknown:
        raise ValueError(f"Adapters {unknown} are not in this model.")
    for module in modules:
        module.set_adapter(names)
    if inference_mode:
        set_requires_grad(model, names, requires_grad=False)


def set_requires_grad(model: nn.Module, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
    """Switch gradients of the named adapters' weights on or off, active or not; nothing else changes."""
    names = _names(adapter_names)
    for _, module in _adapter_modules(model):
        if isinstance(module, BaseTunerLayer):
            containers = [getattr(module, attr) for attr in module.adapter_layer_names]
        else:
            attrs = getattr(module, "adapter_layer_names", ("modules_to_save",))
            containers = [getattr(module, attr) for attr in attrs]
        for container in containers:
            for name in names:
                if name in container:
                    container[name].requires_grad_(requires_grad)


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Upcast adapter `adapter_name`'s fp16/bf16 weights to fp32 (what `autocast_adapter_dtype=True` means:
    the base may be half precision, the small adapter trains in fp32). Other dtypes are left alone."""
    if not autocast_adapter_dtype:
        return
    for _, module in _adapter_modules(model):
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            container = getattr(module, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for param in params:
                if param.dtype in _FLOAT_LOW:
                    param.data = param.data.to(torch.float32)


def _base_weight(module: nn.Module):
    """The base layer's weight (`nn.MultiheadAttention`: `in_proj_weight`), or None."""
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    return weight if weight is not None else getattr(base, "in_proj_weight", None)


def keep_base_adapter_dtype(model: nn.Module, adapter_name: str) -> None:
    """`autocast_adapter_dtype=False`: adapter `adapter_name`'s float weights take their base layer's fp16/bf16
    dtype (layers create them in fp32 for such bases). Quantized and fp32/fp64 bases keep the adapter as created."""
    for _, module in _adapter_modules(model):
        if not isinstance(module, BaseTunerLayer):
            continue
        weight = _base_weight(module)
        if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT_LOW:
            continue
        for param in _adapter_params(module, adapter_name):
            if param.is_floating_point():
                param.data = param.data.to(weight.dtype)


def materialize_adapter(model: nn.Module, adapter_name: str) -> int:
    """Give adapter `adapter_name`'s weights that sit on `meta` (created with `low_cpu_mem_usage=True`) real
    zero-filled storage on their base layer's device, keeping dtype and `requires_grad`; the caller then loads the
    values. Zeros, not garbage: a weight the state dict does not fill leaves the adapter a no-op. Returns how many
    tensors were materialised."""
    count = 0
    for _, module in _adapter_modules(model):
        if not isinstance(module, BaseTunerLayer):
            continue
        weight = _base_weight(module)
        device = weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else torch.device("cpu")
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                if item.is_meta:
                    container[adapter_name] = nn.Parameter(torch.zeros_like(item, device=device),
                                                           requires_grad=item.requires_grad)
                    count += 1
                continue
            for sub in item.modules():
                for name, param in list(sub.named_parameters(recurse=False)):
                    if param.is_meta:
                        setattr(sub, name, nn.Parameter(torch.zeros_like(param, device=device),
                                                        requires_grad=param.requires_grad))
                        count += 1
    return count


def _adapter_params(module: BaseTunerLayer, adapter_name: str) -> list[nn.Parameter]:
    params = []
    for attr in module.adapter_layer_names:
        container = getattr(module, attr, None)
        if container is None or adapter_name not in container:
            continue
        item = container[adapter_name]
        params.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return params


def _base_key(root: nn.Module, key: str) -> Optional[str]:
    """The key `key` (of `root.state_dict()`) had before adapters were injected, or None when it belongs to an
    adapter. Walks the modules: inside a tuner layer only `base_layer` is the original (its name dropped); inside an
    auxiliary wrapper only `original_module` is (dropped too), or a tuner layer around it (trainable tokens)."""
    parts, kept, module = key.split("."), [], root
    for i, part in enumerate(parts):
        child = module._modules.get(part) if module is not None else None
        if child is None:  # a parameter or buffer: the wrappers' own ones belong to adapters
            wrapper = isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper, TrainableTokensLayer))
            return None if wrapper else ".".join(kept + parts[i:])
        if isinstance(module, (BaseTunerLayer, TrainableTokensLayer)):  # trainable tokens: token_adapter.base_layer
            if part != "base_layer" and not (part == "token_adapter" and isinstance(child, TrainableTokensLayer)):
                return None
        elif isinstance(module, AuxiliaryTrainingWrapper):
            if part != "original_module" and not isinstance(child, BaseTunerLayer):
                return None
        else:
            kept.append(part)
        module = child
    return ".".join(kept)


def _base_key_map(model: nn.Module) -> dict[str, str]:
    """{original key: key in the wrapped model} over the base model's own parameters and buffers."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    mapping = {}
    for key in root.state_dict():
        original = _base_key(root, key)
        if original is not None:
            mapping.setdefault(original, key)
    return mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys (no `base_layer` / `original_module` infixes, no
    adapter tensors), from a `PeftModel` or a model with injected adapters. Merged adapters are part of the weights."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = root.state_dict()
    return {original: state[key] for original, key in _base_key_map(model).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load `state_dict` (original keys, as `get_base_model_state_dict` gives) into the wrapped base model; adapter
    weights are untouched. `strict=True`: missing or unexpected keys raise RuntimeError before anything loads.
    Returns `(missing_keys, unexpected_keys)` like `nn.Module.load_state_dict`."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    mapping = _base_key_map(model)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        problems = ([f"Missing key(s) {missing}"] if missing else []) + (
            [f"Unexpected key(s) {unexpected}"] if unexpected else [])
        raise RuntimeError(f"Error(s) in loading the base model state_dict: {'; '.join(problems)}. Nothing was loaded.")
    root.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return torch.nn.modules.module._IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


__all__ = [
    "cast_adapter_dtype",
    "delete_adapter",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "keep_base_adapter_dtype",
    "materialize_adapter",
    "set_adapter",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "set_requires_grad",
]
