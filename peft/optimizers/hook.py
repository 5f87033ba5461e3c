"""`register_lorapro_adjustment`: LoRA-Pro gradients for any torch optimizer (with SGD, the paper's Algorithm 1)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ..tuners.lorapro import math as lp
from .lorapro import LoraProAdamW, _grad, _validate_overrides
from .nonfinite import all_finite, nonfinite_error
from .pairs import LoraProPair, lorapro_pairs, warn_if_dropout
from .sharding import is_sharded


def register_lorapro_adjustment(
    optimizer: Optimizer, model: nn.Module, x_mode: Optional[str] = None, damping: Optional[float] = None
):
    """Make any torch optimizer a LoRA-Pro optimizer: a step pre-hook replaces the gradients of the LoRA factors of
    `model` (a `LoraProConfig` or a plain `LoraConfig` model) by their adjusted gradients (paper eq. 8) right before
    each `optimizer.step()`. `x_mode` / `damping` default to each adapter's `LoraProConfig` options (on a plain LoRA
    model: `LoraProConfig`'s defaults). With SGD this is the paper's Algorithm 1. With a closure
    (`optimizer.step(closure)`, e.g. LBFGS) the gradients the closure makes are adjusted right after each call of
    it. A wrapper such as accelerate's `AcceleratedOptimizer` gets the hook on the optimizer it wraps.

    A NaN or inf among the factors' gradients raises FloatingPointError before anything changes (a GradScaler
    skips such steps before the hook runs). Returns the hook's handle (`handle.remove()` uninstalls it)."""
    optimizer = _innermost(optimizer)
    if isinstance(optimizer, LoraProAdamW):
        raise ValueError("LoraProAdamW already adjusts the gradients; registering the adjustment would do it twice.")
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"Expected a torch.optim.Optimizer, got {type(optimizer)!r}.")
    _validate_overrides(None, x_mode, damping)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    pairs = []
    for pair in lorapro_pairs(model):
        has_A, has_B = id(pair.A) in in_optimizer, id(pair.B) in in_optimizer
        if has_A != has_B:
            raise ValueError(f"The optimizer holds only one factor of LoRA adapter {pair.adapter_name!r}; "
                             "give it both A and B.")
        if has_A:
            pairs.append(pair)
    if not pairs:
        raise ValueError("The optimizer holds no LoRA factor of this model.")
    _refuse_sharded(pairs)
    warn_if_dropout(pairs, stacklevel=2)

    def adjust(opt: Optimizer, args: tuple, kwargs: dict):  # args: (optimizer, *step's positional arguments)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            _adjust_gradients(pairs, x_mode, damping)
            return None

        def adjusted_closure():  # the step makes its gradients inside the closure: adjust them there
            loss = closure()
            _adjust_gradients(pairs, x_mode, damping)
            return loss

        if len(args) > 1:
            return (args[0], adjusted_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": adjusted_closure}

    return optimizer.register_step_pre_hook(adjust)


def _innermost(optimizer: Optimizer) -> Optimizer:
    """The optimizer whose `step` really runs: accelerate's `AcceleratedOptimizer` (as the Trainer holds it) keeps it
    in `.optimizer` and has no step hooks of its own."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _refuse_sharded(pairs: list[LoraProPair]) -> None:
    """ValueError for FSDP2 (DTensor) factors: the hook adjusts whole gradients only."""
    for pair in pairs:
        if is_sharded(pair.A) or is_sharded(pair.B):
            raise ValueError(f"register_lorapro_adjustment does not support FSDP2 (the factors of {pair.describe()} "
                             "are DTensors); use LoraProAdamW, which steps them as row shards.")


@torch.no_grad()
def _adjust_gradients(pairs: list[LoraProPair], x_mode: Optional[str], damping: Optional[float]) -> None:
    """Replace the gradients of every pair's A and B by their adjusted gradients (paper eq. 8), in place; raise
    FloatingPointError first if one of them is not finite."""
    pairs = [pair.current() for pair in pairs]
    _refuse_sharded(pairs)
    todo = [pair for pair in pairs if pair.A.grad is not None or pair.B.grad is not None]
    grads = [(f"{role} of {pair.describe()}", p.grad) for pair in todo for role, p in (("A", pair.A), ("B", pair.B))
             if p.grad is not None]
    if not all_finite(g for _, g in grads):
        raise nonfinite_error(grads)
    dampings = [pair.options.damping if damping is None else damping for pair in todo]
    grams = lp.grams_batched([pair.matrices() for pair in todo], dampings)
    for pair, g, d in zip(todo, grams, dampings):
        gA, gB = pair.adjusted_gradients(_grad(pair.A), _grad(pair.B),
                                         pair.options.x_mode if x_mode is None else x_mode, d, g)
        for param, new in ((pair.A, gA), (pair.B, gB)):
            if param.grad is None:
                param.grad = new.to(param.dtype)
            else:
                param.grad.copy_(new)
