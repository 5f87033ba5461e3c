"""Tied-LoRA's math as pure tensor functions.

Notation: a layer maps `in -> out`; the tied `A` is `(r, in)` and `B` `(out, r)`, shared by all layers of that shape;
layer l has `u` `(r,)` and `v` `(out,)` (None: the vector is fixed to ones); `s = lora_alpha / r`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def shape_group(in_features: int, out_features: int) -> str:
    """Name of the tied pair for layers of this shape: `"<out>x<in>"` (the (out, in) weight shape)."""
    return f"{out_features}x{in_features}"


def tied_delta_weight(
    A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """`s diag(v) B diag(u) A`, shaped `(out, in)`."""
    left = B if v is None else v[:, None] * B  # (out, r)
    right = A if u is None else u[:, None] * A  # (r, in)
    return scale * (left @ right)


def tied_update(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """The adapter's output for input `x` (..., in): `s v * (B (u * (A x)))`, (..., out); never forms B A."""
    hidden = F.linear(x, A)  # (..., r)
    if u is not None:
        hidden = u * hidden
    out = F.linear(hidden, B)  # (..., out)
    if v is not None:
        out = v * out
    return scale * out
