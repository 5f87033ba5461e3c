"""First-match dispatch from a base module to its LoRA layer class. Backends append their own dispatcher."""

from __future__ import annotations

import warnings
from typing import Callable, Optional

from torch import nn

from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .layer import Linear
from .mha import MultiheadAttention

Dispatcher = Callable[..., Optional[nn.Module]]


class UnsupportedTargetError(ValueError):
    """Raised by a dispatcher that recognises a target's family but has no LoRA layer for it (the remaining
    dispatchers are not tried); `create_lora_module` re-raises it naming the module and its type."""


def dispatch_default(target: nn.Module, adapter_name: str, lora_config, **kwargs) -> Optional[nn.Module]:
    """Plain PyTorch / transformers layers: Embedding, Conv1d/2d/3d, MultiheadAttention, Linear, GPT-2's Conv1D."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, **kwargs)
    for conv_type, layer_cls in ((nn.Conv1d, Conv1d), (nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d)):
        if isinstance(base, conv_type):
            return layer_cls(target, adapter_name, **kwargs)
    if isinstance(base, nn.MultiheadAttention):
        return MultiheadAttention(target, adapter_name, **kwargs)
    if type(base) is nn.Linear or (isinstance(base, nn.Linear) and base.weight.dtype.is_floating_point):
        if kwargs.get("fan_in_fan_out"):
            warnings.warn("fan_in_fan_out=True but the target is nn.Linear (stored out x in); using False.")
        kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = False
        return Linear(target, adapter_name, **kwargs)
    if type(base).__name__ == "Conv1D":
        if not kwargs.get("fan_in_fan_out"):
            warnings.warn("The target is a Conv1D (stored in x out); setting fan_in_fan_out=True.")
        kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = True
        return Linear(target, adapter_name, **kwargs)
    return None


def dispatch_custom(target: nn.Module, adapter_name: str, lora_config, **kwargs) -> Optional[nn.Module]:
    """The user's own layer classes (`LoraConfig._register_custom_module({module_type: layer_cls})`), first match
    by `isinstance` in registration order; the class is called as `layer_cls(target, adapter_name, config=...,
    **layer kwargs)`, upstream's calling convention."""
    custom = getattr(lora_config, "_custom_modules", None)
    if not custom:
        return None
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    for module_type, layer_cls in custom.items():
        if isinstance(base, module_type):
            return layer_cls(target, adapter_name, config=lora_config, **kwargs)
    return None


# Backends (bitsandbytes, ...) insert their dispatcher at the front: they handle subclasses of nn.Linear.
DISPATCHERS: list[Dispatcher] = [dispatch_default]


def create_lora_module(target: nn.Module, adapter_name: str, lora_config, key: str, **kwargs) -> nn.Module:
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    for dispatch in [dispatch_custom, *DISPATCHERS]:  # a user's registered classes win over the built-in ones
        try:
            module = dispatch(target, adapter_name, lora_config, **kwargs)
        except UnsupportedTargetError as err:
            raise ValueError(
                f"Target module {key!r} of type {type(base).__module__}.{type(base).__name__}: {err}"
            ) from None
        if module is not None:
            return module
    raise ValueError(
        f"Target module {key!r} of type {type(base).__module__}.{type(base).__name__} has no LoRA layer; "
        "supported: torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d, torch.nn.MultiheadAttention, "
        "transformers Conv1D, "
        "bitsandbytes Linear4bit / Linear8bitLt (when bitsandbytes is installed)."
    )
