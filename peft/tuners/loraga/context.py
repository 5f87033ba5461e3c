"""Where the estimated gradients wait between `estimate_gradient` and the LoRA-GA initialisation.

Two routes, each holding the gradients no longer than what they belong to, and finding them by the model object
itself (never by `id()`, which a later object may reuse):

- `LoraGAContext(model, named_grad)`: the open context object holds them; tuners built on `model` while it is open
  find it among the open contexts (a stack, emptied as each `with` block ends). On exit the context drops the
  gradients and the model, so `del named_grad` afterwards frees them.
- `register_gradients` (the upstream `preprocess_loraga` route, which has no context manager): a weak mapping from
  the model to its gradients, so they die with the model; the initialisation that uses them drops them.

Nothing is stored on the model or its modules, except upstream's documented `module._peft_loraga_grad` view that
`preprocess_loraga` sets (the same tensors), removed together with the pending entry. Gradients are looked up by
module name, with the adapter machinery spelled out of the name (`base_model.model.` prefix, `.base_layer`), so
names taken on a plain model and on a `PeftModel` around it agree.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

_OPEN: list["LoraGAContext"] = []  # contexts inside their `with` block, innermost last
# preprocess_loraga: unwrapped model -> normalized name -> gradient; an entry dies with its model
_PENDING: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
# preprocess_loraga: unwrapped model -> names of its targets that no backward pass reached (LoRA's default init)
_UNREACHED: "weakref.WeakKeyDictionary[nn.Module, frozenset[str]]" = weakref.WeakKeyDictionary()
UPSTREAM_GRAD_ATTR = "_peft_loraga_grad"  # where upstream's preprocess_loraga shows a target's gradient


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


def by_plain_name(named_grad: dict) -> dict:
    """`named_grad` keyed by `normalize_name`; owner-only gradients (`distributed.OwnedGradients`) keep their type."""
    rekeyed = getattr(named_grad, "rekeyed", None)
    return rekeyed(normalize_name) if callable(rekeyed) else {normalize_name(k): v for k, v in named_grad.items()}


class LoraGAContext:
    """Context manager: inside it, `get_peft_model(model, LoraGAConfig(...))` initialises from `named_grad`.

    `named_grad` maps module names (as in `model.named_modules()`) to the averaged gradient of that module's
    weight, as returned by `estimate_gradient`. The context holds them (never a copy) only while it is open: on
    exit it drops them and the model, so `del named_grad` afterwards frees them; a closed context cannot be
    opened again."""

    def __init__(self, model: nn.Module, named_grad: Optional[dict[str, torch.Tensor]] = None) -> None:
        if named_grad is not None and not isinstance(named_grad, dict):
            raise ValueError(f"named_grad must be a dict from module name to tensor, got {type(named_grad).__name__}.")
        self.model = model
        self.named_grad = named_grad if named_grad is not None else {}
        self._target: Optional[nn.Module] = None  # the unwrapped model, while open
        self._grads: Optional[dict[str, torch.Tensor]] = None  # normalized name -> gradient, while open
        self._closed = False

    def __enter__(self) -> "LoraGAContext":
        if self._closed:
            raise RuntimeError("This LoraGAContext is closed (it dropped its gradients on exit); open a new one.")
        target = unwrap_model(self.model)
        if _open_context(target) is not None:
            raise RuntimeError("A LoraGAContext is already open for this model; nested contexts are not supported.")
        self._target, self._grads = target, by_plain_name(self.named_grad)
        _OPEN.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _OPEN[:] = [ctx for ctx in _OPEN if ctx is not self]
        self._target = self._grads = self.model = self.named_grad = None
        self._closed = True


def _open_context(model: nn.Module) -> Optional[LoraGAContext]:
    """The open context whose (unwrapped) model is `model` itself, or None."""
    return next((ctx for ctx in reversed(_OPEN) if ctx._target is model), None)


def active_gradients(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The gradients waiting for `model` (an open context first, then `register_gradients`'), or None."""
    plain = unwrap_model(model)
    context = _open_context(plain)
    return context._grads if context is not None else _PENDING.get(plain)


def consume_gradient(model: nn.Module, name: str) -> None:
    """Drop the `register_gradients` entry of module `name` once it has been used; forget the model when none is
    left (an open context keeps its own gradients until it exits)."""
    plain = unwrap_model(model)
    pending = _PENDING.get(plain)
    if _open_context(plain) is not None or pending is None:
        return
    _drop_grad_attributes(plain, [pending.pop(normalize_name(name), None)])
    if not pending:
        forget_gradients(plain)


def register_gradients(model: nn.Module, named_grad: dict[str, torch.Tensor], unreached: frozenset = frozenset()
                       ) -> None:
    """Make `named_grad` the pending gradients of `model` until an initialisation uses them, or the model is
    garbage collected (the upstream `preprocess_loraga` route, which has no context manager). `unreached`: target
    names that got no gradient (they keep LoRA's default init instead of raising)."""
    forget_gradients(model)
    plain = unwrap_model(model)
    _PENDING[plain] = by_plain_name(named_grad)
    _UNREACHED[plain] = frozenset(normalize_name(n) for n in unreached)


def unreached_targets(model: nn.Module) -> frozenset:
    """`register_gradients`' unreached names for `model`, while no LoraGAContext is open for it."""
    plain = unwrap_model(model)
    return frozenset() if _open_context(plain) is not None else _UNREACHED.get(plain, frozenset())


def _drop_grad_attributes(model: nn.Module, tensors: Optional[list] = None) -> None:
    """Remove `UPSTREAM_GRAD_ATTR` from `model`'s modules: all, or those holding one of `tensors`."""
    for module in model.modules():
        held = module.__dict__.get(UPSTREAM_GRAD_ATTR)
        if held is not None and (tensors is None or any(held is t for t in tensors)):
            del module.__dict__[UPSTREAM_GRAD_ATTR]


def forget_gradients(model: nn.Module) -> None:
    """Drop any pending gradients of `model` (after the injection that used them: what is left was estimated on
    the base before its offset, and must not initialise a later adapter)."""
    plain = unwrap_model(model)
    if _PENDING.pop(plain, None) is not None:
        _drop_grad_attributes(plain)
    _UNREACHED.pop(plain, None)
