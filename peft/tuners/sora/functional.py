"""Pure SoRA math on tensors (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models").

Notation: the adapted weight W is `m x n` (out x in); A is `r x n`, B is `m x r`, the gate g has `r` entries and
`s` is the scale. The update is

    delta W = s * B diag(g) A        (paper eq. 4: `z = W0 x + B (g ⊙ (A x))`)

and the gate is trained by proximal gradient descent on `L(g) + lambda * ||g||_1` (paper eq. 6):

    g <- T_{eta * lambda}(g - eta * dL/dg),    T_tau(x) = sign(x) * max(|x| - tau, 0)   (soft thresholding)

A gate entry that reaches exactly zero switches its rank component off; `compact_factors` then removes it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def sora_delta_weight(
    lora_A: torch.Tensor, lora_B: torch.Tensor, gate: torch.Tensor, scaling: float, fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """`s * B diag(g) A` in at least fp32: A (r, n), B (m, r), g (r,) -> (m, n), or (n, m) when the base stores W
    transposed (GPT-2's Conv1D)."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    gated_B = lora_B.to(dtype) * gate.to(dtype)  # (m, r): column j scaled by g_j
    delta = (gated_B @ lora_A.to(dtype)) * scaling  # (m, n)
    return delta.T if fan_in_fan_out else delta


def sora_scaling(lora_alpha: float, r: int) -> float:
    """`s = lora_alpha / r` with `r` the adapter's maximal rank (the config's `r`, the paper's r_max)."""
    return lora_alpha / r


def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """`T_tau(x) = sign(x) * max(|x| - tau, 0)` entrywise (the proximal operator of `tau * ||x||_1`). Entries with
    `|x| <= tau` become exactly +0.0."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"Invalid threshold={threshold!r}: expected a finite number >= 0.")
    shrunk = values - torch.sign(values) * threshold
    return torch.where(values.abs() > threshold, shrunk, torch.zeros_like(values))


def proximal_gate_step(
    gate: torch.Tensor, lr: float, sparsity_lambda: float, grad: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One proximal gradient step on the gate (paper eq. 6): `T_{lr * lambda}(g - lr * grad)`.

    With `grad=None` only the proximal map is applied, `T_{lr * lambda}(g)`: the form used after another optimizer
    (e.g. AdamW) has already taken the smooth step on g. Returns a new tensor."""
    for name, value in (("lr", lr), ("sparsity_lambda", sparsity_lambda)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid {name}={value!r}: expected a finite number >= 0.")
    moved = gate if grad is None else gate - lr * grad
    return soft_threshold(moved, lr * sparsity_lambda)


LAMBDA_SCHEDULES = ("constant", "linear", "exp_linear", "log_linear")


def scheduled_lambda(
    step: int, sparsity_lambda: float, max_lambda: Optional[float] = None, schedule_steps: int = 0,
    schedule: str = "constant", warmup_steps: int = 0,
) -> float:
    """The sparsity weight at optimizer step `step` (0-based): 0 during `warmup_steps`, then it moves from
    `sparsity_lambda` to `max_lambda` over `schedule_steps` steps and stays there (the paper's sparsifying
    scheduler, Algorithm 1, which raises the weight to trade accuracy for sparsity):

    - "constant": `sparsity_lambda` throughout (warm-up aside);
    - "linear": linear interpolation;
    - "exp_linear": geometric (linear in log lambda; both ends must be > 0);
    - "log_linear": `log` of a linear interpolation between `exp(sparsity_lambda)` and `exp(max_lambda)`.
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"Invalid schedule={schedule!r}: expected one of {LAMBDA_SCHEDULES}.")
    if step < warmup_steps:
        return 0.0
    if schedule == "constant":
        return float(sparsity_lambda)
    if max_lambda is None or schedule_steps <= 0:
        raise ValueError(f"Invalid max_lambda={max_lambda!r} / schedule_steps={schedule_steps!r} for schedule="
                         f"{schedule!r}: expected a number and a positive int.")
    t = min(max(step - warmup_steps, 0) / schedule_steps, 1.0)
    start, end = float(sparsity_lambda), float(max_lambda)
    if schedule == "linear":
        return start + t * (end - start)
    if schedule == "exp_linear":
        if start <= 0 or end <= 0:
            raise ValueError(f"Invalid sparsity_lambda={start!r} / max_lambda={end!r} for schedule='exp_linear': "
                             "expected both > 0.")
        return math.exp(math.log(start) + t * (math.log(end) - math.log(start)))
    return math.log(math.exp(start) + t * (math.exp(end) - math.exp(start)))


def surviving_components(gate: torch.Tensor) -> torch.Tensor:
    """Indices (long, ascending) of the gate entries that are not exactly zero: the live rank components."""
    return torch.nonzero(gate != 0, as_tuple=False).flatten()


def compact_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, gate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', B', g') keeping only the live components: A (r, n) -> (k, n), B (m, r) -> (m, k), g (r,) -> (k,), with
    `B' diag(g') A' == B diag(g) A` (the dropped terms are exactly zero). With no live component (k = 0) one
    all-zero component is kept, so the layer keeps rank 1 and adds exactly nothing."""
    keep = surviving_components(gate)
    if keep.numel() == 0:
        return (torch.zeros_like(lora_A[:1]), torch.zeros_like(lora_B[:, :1]), torch.zeros_like(gate[:1]))
    return lora_A[keep].clone(), lora_B[:, keep].clone(), gate[keep].clone()
