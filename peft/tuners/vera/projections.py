"""VeRA's math as pure tensor functions: the shared random projections and the per-layer update.

Notation: a layer maps `in -> out`; `A` is `(r, in_max)`, `B` is `(out_max, r)`, shared by all layers; a layer uses
the top-left blocks `A[:, :in]` and `B[:out, :]`. `lambda_d` is `(r,)`, `lambda_b` is `(out,)`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def kaiming_uniform_bound(fan_in: int) -> float:
    """Half-width of He / Kaiming-uniform init with gain sqrt(2): `sqrt(3) * sqrt(2) / sqrt(fan_in)` (= sqrt(6 /
    fan_in)), evaluated in this order so that the draws match upstream PEFT's bit for bit."""
    return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))


def draw_projections(
    seed: int, r: int, in_max: int, out_max: int, dtype: Optional[torch.dtype] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair `(A (r, in_max), B (out_max, r))`, drawn on the CPU from one generator seeded with
    `seed`: first A, then B, each uniform on `[-b, b]` with `b = kaiming_uniform_bound(fan_in)`, the fan-in being a
    matrix's number of columns (`in_max` for A, `r` for B). `dtype` defaults to torch's default dtype."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mats = []
    for shape in ((r, in_max), (out_max, r)):
        bound = kaiming_uniform_bound(shape[1])
        mats.append(torch.empty(shape, dtype=dtype, device="cpu").uniform_(-bound, bound, generator=generator))
    return mats[0], mats[1]


def vera_delta_weight(
    A: torch.Tensor, B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor, in_features: int
) -> torch.Tensor:
    """`diag(lambda_b) B[:out] diag(lambda_d) A[:, :in]`, shaped `(out, in)` with `out = len(lambda_b)`."""
    out_features = lambda_b.shape[0]
    return (lambda_b[:, None] * B[:out_features]) @ (lambda_d[:, None] * A[:, :in_features])


def vera_update(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor
) -> torch.Tensor:
    """The adapter's output for input `x` (..., in): `lambda_b * (B[:out] (lambda_d * (A[:, :in] x)))`, (..., out);
    never forms the (out, in) matrix."""
    in_features, out_features = x.shape[-1], lambda_b.shape[0]
    hidden = lambda_d * F.linear(x, A[:, :in_features])  # (..., r)
    return lambda_b * F.linear(hidden, B[:out_features])  # (..., out)
