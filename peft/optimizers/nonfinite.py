"""The non-finite gradient check of the LoRA-Pro optimizers.

One NaN or inf in a gradient (e.g. an fp16 overflow without a GradScaler) would make A and B non-finite, and every
later step would then fail in `torch.linalg.eigh` with an error that never mentions NaN. So the gradients are
checked before a step changes anything: one fused reduction over all of them (`torch._foreach_norm`, the 2-norm of
each gradient, NaN or inf when one entry is) and one host synchronisation per device and dtype. Only when a norm is
not finite are the gradients looked at entry by entry (`isfinite`), which tells a real NaN/inf from a norm that
overflowed on finite entries, and names them. (The inf-norm would never overflow, but on a CPU it is ten times
slower than the 2-norm.)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")


def validate_nonfinite(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite={nonfinite!r}: expected one of {NONFINITE_POLICIES}.")


def all_finite(grads: Iterable[torch.Tensor]) -> bool:
    """Whether every entry of every (dense) tensor in `grads` is finite."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        if not grad.is_sparse:  # sparse gradients are refused by the step itself
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for gs in groups.values():
        if not bool(torch.stack(torch._foreach_norm(gs)).isfinite().all()):  # a NaN/inf, or finite entries overflowed
            if not all(bool(torch.isfinite(g).all()) for g in gs):
                return False
    return True


def nonfinite_error(named_grads: Sequence[tuple[str, torch.Tensor]]) -> FloatingPointError:
    """The error for a step refused because of non-finite gradients, naming the first few (of `(name, grad)`)."""
    bad = [name for name, grad in named_grads if not grad.is_sparse and not bool(torch.isfinite(grad).all())]
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return FloatingPointError(
        f"Non-finite gradient (NaN or inf) in {shown or 'a gradient'}: the step was not taken, the parameters and "
        "the optimizer state are untouched. Typical causes: fp16 overflow without a GradScaler "
        "(torch.amp.GradScaler skips such steps; or train in bf16), a diverging loss. Pass nonfinite='skip' to skip "
        "such steps and count them (optimizer.skipped_steps) instead."
    )
