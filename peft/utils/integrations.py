"""Creating modules without allocating their weights (upstream's `peft.utils.integrations` API).

`init_empty_weights()` puts every parameter registered inside the block on the meta device (and, with
`include_buffers=True`, every buffer and every tensor made by `torch.empty/zeros/ones/full`), the way
`accelerate.init_empty_weights` does. `skip_init_on_device(fn)` runs `fn` as if outside that block, so code that has
to re-register real parameters (such as the MultiheadAttention adapter) keeps them on their device.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

_FACTORIES = ("empty", "zeros", "ones", "full")


class _SkipState:
    """How many `skip_init_on_device` calls are running; while > 0 `init_empty_weights` leaves parameters alone."""

    depth = 0


def _move_registered(device: torch.device, original: Callable) -> Callable:
    def register_parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is None or _SkipState.depth > 0:
            return
        registered = module._parameters[name]
        extra = dict(registered.__dict__)
        extra["requires_grad"] = param.requires_grad
        module._parameters[name] = type(registered)(registered.to(device), **extra)

    return register_parameter


def _move_buffer(device: torch.device, original: Callable) -> Callable:
    def register_buffer(module: nn.Module, name: str, tensor: Optional[torch.Tensor], persistent: bool = True) -> None:
        original(module, name, tensor, persistent=persistent)
        if tensor is not None and _SkipState.depth == 0:
            module._buffers[name] = module._buffers[name].to(device)

    return register_buffer


def _on_device(device: torch.device, factory: Callable) -> Callable:
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if _SkipState.depth == 0:
            kwargs["device"] = device
        return factory(*args, **kwargs)

    return make


@contextmanager
def init_empty_weights(include_buffers: Optional[bool] = None) -> Iterator[None]:
    """Inside the block, parameters (and with `include_buffers`, buffers and factory-made tensors) land on meta."""
    device = torch.device("meta")
    patches = [(nn.Module, "register_parameter", _move_registered(device, nn.Module.register_parameter))]
    if include_buffers:
        patches.append((nn.Module, "register_buffer", _move_buffer(device, nn.Module.register_buffer)))
        patches += [(torch, name, _on_device(device, getattr(torch, name))) for name in _FACTORIES]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def skip_init_on_device(func: Callable) -> Callable:
    """Decorator: `func` creates its parameters normally even when called inside `init_empty_weights()`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _SkipState.depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            _SkipState.depth -= 1

    return wrapper
