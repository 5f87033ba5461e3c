"""KronA's math as pure tensor functions (Edalati et al. 2022, arXiv 2212.10650).

The update of an `m x n` weight (out x in) is `dW = s * kron(A, B)` with `A` of shape `(a1, a2)` and `B` of shape
`(b1, b2) = (m / a1, n / a2)`. Row-major indices: `kron(A, B)[i*b1 + k, j*b2 + l] = A[i, j] * B[k, l]`.

Applying it to a vector without forming the `m x n` matrix (the "vec trick" in row-major form): reshape
`x` (length n) into `X` of shape `(a2, b2)`, `X[j, l] = x[j*b2 + l]`; then

    (kron(A, B) x)[i*b1 + k] = sum_{j,l} A[i, j] B[k, l] X[j, l] = (A X B^T)[i, k],

i.e. `kron(A, B) x = vec_row(A X B^T)` -- the column-major statement `vec(B X' A^T)` with `X' = X^T` of shape
`(b2, a2)` is the same identity. Cost per token: `a2*b2*b1 + a1*a2*b1` multiply-adds instead of `m*n`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

FactorSpec = Optional[Union[int, tuple[int, int], list[int]]]


def kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`x @ kron(A, B)^T` for `x` of shape `(..., n)`: shape `(..., m)`, `m = a1*b1`, `n = a2*b2`."""
    a1, a2 = A.shape
    b1, b2 = B.shape
    X = x.reshape(*x.shape[:-1], a2, b2)  # (..., a2, b2)
    XBt = X @ B.transpose(0, 1)  # (..., a2, b1)
    Y = A @ XBt  # (..., a1, b1)
    return Y.reshape(*x.shape[:-1], a1 * b1)


def kron_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * kron(A, B)`: the `(a1*b1, a2*b2)` update, formed only to merge it into the base weight."""
    return torch.kron(A, B) * scale


def nearest_divisor(n: int, target: float) -> int:
    """The divisor of `n` closest to `target` (ties: the smaller one)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def factor_shapes(out_features: int, in_features: int, spec: FactorSpec,
                  where: str = "") -> tuple[tuple[int, int], tuple[int, int]]:
    """((a1, a2), (b1, b2)) for an `out x in` weight.

    `spec`: None picks `a1` / `a2` as the divisors of out / in nearest to their square roots (this minimises
    `a1*a2 + b1*b2`, the parameter count, for a square-ish weight); an int `d` means `(d, d)`; a pair is `(a1, a2)`.
    Raises ValueError (naming the module by `where`) when `a1` does not divide `out_features` or `a2` does not
    divide `in_features`.
    """
    if spec is None:
        a1 = nearest_divisor(out_features, math.sqrt(out_features))
        a2 = nearest_divisor(in_features, math.sqrt(in_features))
    elif isinstance(spec, int):
        a1 = a2 = spec
    else:
        a1, a2 = (int(v) for v in spec)
    if out_features % a1 or in_features % a2:
        raise ValueError(
            f"Invalid krona_dim={spec!r}{where} (A of shape ({a1}, {a2})) for a weight of out_features={out_features}, "
            f"in_features={in_features}: expected a1 dividing {out_features} and a2 dividing {in_features} "
            f"(divisors of out: {_divisors(out_features)}, of in: {_divisors(in_features)})."
        )
    return (a1, a2), (out_features // a1, in_features // a2)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def krona_param_count(out_features: int, in_features: int, spec: FactorSpec) -> int:
    """Trainable values of one adapted weight: `a1*a2 + (m/a1)*(n/a2)`."""
    (a1, a2), (b1, b2) = factor_shapes(out_features, in_features, spec)
    return a1 * a2 + b1 * b2
