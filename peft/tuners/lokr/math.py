"""LoKr's update as pure functions: the dimension split, the factor layout, and `scale * W1 ⊗ W2`."""

from __future__ import annotations

import torch

from ..lycoris_common.math import cp_rebuild


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def split_dimension(dim: int, factor: int = -1) -> tuple[int, int]:
    """Write `dim = p * q` for the Kronecker factors (the LyCORIS convention, reproduced exactly):

    - `factor > 0` dividing `dim`: `(factor, dim // factor)`, in that order;
    - otherwise (`factor == -1` means no limit): the most balanced split `(p, q)`, `p <= q`, whose larger part is at
      most the limit when such a split exists, else the split at the largest divisor `p <= limit`, i.e.
      `(p, dim // p)`; `(1, dim)` when nothing above 1 fits.
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    divisors = _divisors(dim)
    balanced = next(d for d in divisors if d * d >= dim)  # smallest divisor at or above sqrt(dim)
    if balanced <= limit:
        return dim // balanced, balanced
    below = [d for d in divisors if d <= limit]
    p = below[-1] if below else 1
    return p, dim // p


def lokr_shapes(out_features: int, in_per_group: int, kernel: tuple[int, ...], r: int, factor: int,
                decompose_both: bool, effective_conv: bool) -> dict[str, tuple[int, ...]]:
    """Factor shapes for a base weight (out, in_per_group, *kernel) with `out = a b`, `in_per_group = c d`.

    W1 (a, c): `lokr_w1`, or `lokr_w1_a` (a, r) @ `lokr_w1_b` (r, c) when `decompose_both` and r < max(a, c) / 2.
    W2 (b, d, *kernel): `lokr_w2` when r >= max(b, d) / 2; else, for a conv with a kernel other than all ones and
    `effective_conv`, a core `lokr_t2` (r, r, k1, k2) with `lokr_w2_a` (r, b), `lokr_w2_b` (r, d) (Conv1d: k2 = 1);
    else `lokr_w2_a` (b, r) @ `lokr_w2_b` (r, d * prod(kernel))."""
    a, b = split_dimension(out_features, factor)
    c, d = split_dimension(in_per_group, factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    flat = d
    for k in kernel:
        flat *= k
    if r >= max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif effective_conv and kernel and any(k != 1 for k in kernel):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=core)
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, flat))
    return shapes


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * kron(W1, W2)`: W1 (a, c), W2 (b, d) -> (a b, c d); a 4-D W2 (b, d, k1, k2) gives (a b, c d, k1, k2)
    (W1 gets two trailing unit dims). Other ranks follow `torch.kron`'s rule (leading unit dims)."""
    w1, w2 = _canonical(w1), _canonical(w2)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2) * scale


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """`t` with row-major strides, size-1 dims included: `torch.kron` views its inputs, and an einsum result or an
    r = 1 product can be "contiguous" with odd strides on its unit dims, which that view refuses."""
    return t.contiguous().view(-1).view(t.shape)


def w2_from_core(core: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor) -> torch.Tensor:
    """W2 of the effective conv form: (b, d, k1, k2) from core (r, r, k1, k2), w2_a (r, b), w2_b (r, d)."""
    return cp_rebuild(core, w2_a, w2_b)
