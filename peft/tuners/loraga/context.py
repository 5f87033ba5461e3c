"""Where the estimated gradients wait between `estimate_gradient` and the LoRA-GA initialisation.

`LoraGAContext(model, named_grad)` makes `named_grad` visible to tuners built on `model` *while the context is
open*; nothing is stored on the model or its modules. Gradients are looked up by module name, with the adapter
machinery spelled out of the name (`base_model.model.` prefix, `.base_layer`), so names taken on a plain model
and on a `PeftModel` around it agree.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

_ACTIVE: dict[int, dict[str, torch.Tensor]] = {}  # open contexts: id(unwrapped model) -> name -> gradient
_PENDING: dict[int, dict[str, torch.Tensor]] = {}  # preprocess_loraga: consumed (popped) by the initialisation


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under a PeftModel / tuner model / DDP wrapper (the object a tuner's `.model` is)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "base_model") and isinstance(model.__dict__.get("_modules", {}).get("base_model"),
                                                       nn.Module) and hasattr(model.base_model, "model"):
            model = model.base_model.model
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
    return model


def normalize_name(name: str) -> str:
    """`base_model.model.a.b.base_layer` -> `a.b`: a module's name on the plain model."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return ".".join(part for part in name.split(".") if part != "base_layer")


class LoraGAContext:
    """Context manager: inside it, `get_peft_model(model, LoraGAConfig(...))` initialises from `named_grad`.

    `named_grad` maps module names (as in `model.named_modules()`) to the averaged gradient of that module's
    weight, as returned by `estimate_gradient`. On exit the context forgets the gradients (it never copies them),
    so `del named_grad` afterwards frees them."""

    def __init__(self, model: nn.Module, named_grad: Optional[dict[str, torch.Tensor]] = None) -> None:
        if named_grad is not None and not isinstance(named_grad, dict):
            raise ValueError(f"named_grad must be a dict from module name to tensor, got {type(named_grad).__name__}.")
        self.model = model
        self.named_grad = named_grad if named_grad is not None else {}
        self._key: Optional[int] = None

    def __enter__(self) -> "LoraGAContext":
        key = id(unwrap_model(self.model))
        if key in _ACTIVE:
            raise RuntimeError("A LoraGAContext is already open for this model; nested contexts are not supported.")
        _ACTIVE[key] = {normalize_name(k): v for k, v in self.named_grad.items()}
        self._key = key
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE.pop(self._key, None)
        self._key = None


def active_gradients(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The gradients waiting for `model` (an open context first, then `register_gradients`'), or None."""
    key = id(unwrap_model(model))
    return _ACTIVE.get(key, _PENDING.get(key))


def consume_gradient(model: nn.Module, name: str) -> None:
    """Drop the `register_gradients` entry of module `name` once it has been used; forget the model when none is
    left, so nothing outlives the initialisation."""
    key = id(unwrap_model(model))
    if key in _ACTIVE or key not in _PENDING:
        return
    _PENDING[key].pop(normalize_name(name), None)
    if not _PENDING[key]:
        del _PENDING[key]


def register_gradients(model: nn.Module, named_grad: dict[str, torch.Tensor]) -> None:
    """Make `named_grad` the pending gradients of `model` until the initialisation consumes them (the upstream
    `preprocess_loraga` route, which has no context manager)."""
    _PENDING[id(unwrap_model(model))] = {normalize_name(k): v for k, v in named_grad.items()}


def forget_gradients(model: nn.Module) -> None:
    """Drop any pending gradients of `model` (e.g. after a failed `get_peft_model`)."""
    _PENDING.pop(id(unwrap_model(model)), None)
