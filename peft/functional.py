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


__all__ = [
    "cast_adapter_dtype",
    "delete_adapter",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_adapter",
    "set_peft_model_state_dict",
    "set_requires_grad",
]
