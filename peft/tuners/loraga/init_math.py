"""Pure tensor math of the LoRA-GA initialisation (Wang, Yu, Li, "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation", NeurIPS 2024, arXiv 2407.05000, section 3.2 and Algorithm 1) and of its final-adapter conversion.

Notation: `W` is (m, n) = (out, in), `G` the averaged gradient of the loss w.r.t. `W`, `G ~ U S V^T`, `s` the LoRA
scale (`alpha / r`, rsLoRA `alpha / sqrt(r)`). The first SGD step on A and B moves `s B A` by
`-lr s^2 (G A^T A + B B^T G)`; with A and B taken from disjoint top singular vectors of G this is the best
rank-2r approximation of the full-fine-tuning step (paper eq. 6-8). Layers map their weight to this (m, n)
matrix before calling these functions (Conv1D and Embedding transpose, Conv2d flattens the kernel).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal, Optional

import torch

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")
SVD_METHODS = ("auto", "exact", "randomized")
EXACT_SVD_MAX_DIM = 1024  # "auto" SVD: exact up to this min(m, n), randomized above (as the reference)

Direction = Literal["ArB2r", "A2rBr", "ArBr", "random"]
Scale = Literal["stable", "gd", "unit", "weightS"]


def check_rank(r: int, m: int, n: int, name: str = "this layer") -> None:
    """LoRA-GA uses 2r singular triplets of G, so it needs `2r <= min(m, n)`."""
    if 2 * r > min(m, n):
        raise ValueError(
            f"LoRA-GA needs 2*r <= min(out, in) for {name}: r={r} but the weight is {m} x {n} "
            f"(at most r={min(m, n) // 2}); lower r or use rank_pattern for this module."
        )


def top_svd(matrix: torch.Tensor, k: int, method: str = "auto", niter: int = 4):
    """Top-k singular triplets of `matrix` (m, n): U (m, k), S (k,), Vh (k, n), S descending.

    "exact" uses `torch.linalg.svd`; "randomized" `torch.svd_lowrank` with `q = min(2k, m, n)` (for k = 2r this is
    the `q = min(4r, m, n)` of the reference); "auto" is exact when `min(m, n) <= EXACT_SVD_MAX_DIM` (cheap there)
    or when q would already be `min(m, n)`, randomized otherwise."""
    if method not in SVD_METHODS:
        raise ValueError(f"Invalid svd method {method!r}: expected one of {SVD_METHODS}.")
    m, n = matrix.shape
    q = min(2 * k, m, n)
    with one_cpu_thread(matrix):
        if method == "exact" or (method == "auto" and (q == min(m, n) or min(m, n) <= EXACT_SVD_MAX_DIM)):
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        else:
            U, S, V = torch.svd_lowrank(matrix, q=q, niter=niter)
            Vh = V.T
    return U[:, :k], S[:k], Vh[:k]


@contextmanager
def one_cpu_thread(matrix: torch.Tensor):
    """Inside, CPU LAPACK runs on one thread. Its SVD result depends on the number of threads (a float32 384 x 1536
    gradient's singular vectors differ by 3e-4 between 1 and 2 threads, float64 ones by 2e-9), and the library may
    pick fewer threads than asked under load, so the same LoRA-GA run gave another init from one process to the
    next; on one thread the SVD is a function of its input. Accelerator tensors are not affected."""
    if matrix.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def direction_indices(r: int, direction: str, generator: Optional[torch.Generator] = None):
    """(indices for A, indices for B) among the top 2r singular triplets (0-based).

    ArB2r: A <- V^T[0:r], B <- U[:, r:2r] (the paper's choice); A2rBr: the swap; ArBr: A odd, B even indices;
    random: a random r of the 2r indices for A (drawn from `generator`), the other r for B."""
    if direction == "ArB2r":
        return torch.arange(0, r), torch.arange(r, 2 * r)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(0, r)
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    if direction == "random":
        perm = torch.randperm(2 * r, generator=generator)
        return perm[:r].sort().values, perm[r:].sort().values
    raise ValueError(f"Invalid direction {direction!r}: expected one of {DIRECTIONS}.")


def scale_factor(
    scale: str, m: int, scaling: float, stable_gamma: float = 16,
    weight_singular_values: Optional[torch.Tensor] = None,
) -> float:
    """The factor applied to both A and B (DESIGN.md 4.3; paper section 3.3, "stable scale" eq. 11).

    stable: `m**0.25 / sqrt(gamma)`; gd: `1 / s`; unit: 1; weightS: `mean_i sqrt(sigma_i(W) / s)` over the top r
    singular values of W (pass them as `weight_singular_values`)."""
    if scale == "stable":
        if stable_gamma <= 0:
            raise ValueError(f"Invalid stable_gamma={stable_gamma!r}: expected a positive number.")
        return m**0.25 / math.sqrt(stable_gamma)
    if scale == "gd":
        return 1.0 / scaling
    if scale == "unit":
        return 1.0
    if scale == "weightS":
        if weight_singular_values is None:
            raise ValueError("scale='weightS' needs the top-r singular values of W.")
        return torch.sqrt(weight_singular_values.double().clamp_min(0) / scaling).mean().item()
    raise ValueError(f"Invalid scale {scale!r}: expected one of {SCALES}.")


def lora_ga_factors(
    grad: torch.Tensor, r: int, scaling: float, direction: str = "ArB2r", scale: str = "stable",
    stable_gamma: float = 16, weight: Optional[torch.Tensor] = None, svd: str = "auto",
    generator: Optional[torch.Generator] = None, compute_dtype: torch.dtype = torch.float32,
    svd_factors: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, n) and B (m, r) from the gradient G (m, n), in `compute_dtype` (singular values not used).

    `weight` (m, n) is needed for scale="weightS" only. `svd_factors`: G's top singular triplets `(U (m, k), S (k,),
    Vh (k, n))` already known (a `LowRankGradient` from `estimate_gradient(low_rank=k)`, S descending, U and Vh
    orthonormal): used instead of an SVD of `grad` (then pass `grad=None`); needs k >= 2r."""
    if direction not in DIRECTIONS:
        raise ValueError(f"Invalid direction {direction!r}: expected one of {DIRECTIONS}.")
    if scale not in SCALES:
        raise ValueError(f"Invalid scale {scale!r}: expected one of {SCALES}.")
    if svd_factors is not None:
        U, S, Vh = svd_factors
        m, n = U.shape[0], Vh.shape[1]
        check_rank(r, m, n)
        if S.shape[0] < 2 * r:
            raise ValueError(f"LoRA-GA needs the top 2r={2 * r} singular triplets of the gradient, but the low-rank "
                             f"gradient has k={S.shape[0]} < 2r={2 * r}: estimate with low_rank >= {2 * r}.")
        U, Vh = U[:, :2 * r].to(compute_dtype), Vh[:2 * r].to(compute_dtype)
    else:
        m, n = grad.shape
        check_rank(r, m, n)
        U, _, Vh = top_svd(grad.to(compute_dtype), 2 * r, svd)  # (m, 2r), (2r,), (2r, n)
    idx_A, idx_B = direction_indices(r, direction, generator)
    A, B = Vh[idx_A], U[:, idx_B]  # (r, n), (m, r)
    sigma_W = None
    if scale == "weightS":
        if weight is None:
            raise ValueError("scale='weightS' needs the base weight W.")
        _, sigma_W, _ = top_svd(weight.to(compute_dtype), 2 * r, svd)  # q = 4r oversampling when randomized
        sigma_W = sigma_W[:r]
    factor = scale_factor(scale, m, scaling, stable_gamma, sigma_W)
    return (A * factor).contiguous(), (B * factor).contiguous()


def offset_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`W - s B A` (W (m, n), A (r, n), B (m, r)) in at least fp32 from A and B as given, rounded once to W's dtype.

    Pass A and B exactly as they will be stored, so that `base(x) + s B A x` reproduces `W x` at init."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    delta = scaling * (lora_B.to(dtype) @ lora_A.to(dtype))  # (m, n)
    return (weight.to(dtype) - delta).to(weight.dtype)


# --- final adapter: express the trained LoRA-GA adapter as a plain LoRA on the original weights -----------------
def final_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, init_A: torch.Tensor, init_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`A' = [A; A0]` (2r, ...), `B' = [B, -B0]` (m, 2r, ...) so that `B' A' = B A - B0 A0`.

    A is concatenated along dim 0 and B along dim 1, which covers Linear (r, n)/(m, r), Embedding and Conv2d
    (A (r, c_in, kh, kw), B (c_out, r, 1, 1)) factors alike."""
    if lora_A.shape != init_A.shape or lora_B.shape != init_B.shape:
        raise ValueError(
            f"Initial factors {tuple(init_A.shape)}/{tuple(init_B.shape)} do not match the trained ones "
            f"{tuple(lora_A.shape)}/{tuple(lora_B.shape)}."
        )
    new_A = torch.cat([lora_A, init_A.to(lora_A.dtype)], dim=0)
    new_B = torch.cat([lora_B, -init_B.to(lora_B.dtype)], dim=1)
    return new_A, new_B


def final_alpha(lora_alpha: float, use_rslora: bool) -> float:
    """Alpha of the rank-2r adapter keeping the scale: `2 alpha / 2r = alpha / r`; rsLoRA:
    `sqrt(2) alpha / sqrt(2r) = alpha / sqrt(r)`."""
    return lora_alpha * (math.sqrt(2.0) if use_rslora else 2.0)


def final_patterns(rank_pattern: dict, alpha_pattern: dict, use_rslora: bool) -> tuple[dict, dict]:
    """Rank and alpha patterns of the rank-2r adapter: every rank doubled, every alpha as in `final_alpha`."""
    ranks = {k: 2 * int(v) for k, v in (rank_pattern or {}).items()}
    alphas = {k: final_alpha(v, use_rslora) for k, v in (alpha_pattern or {}).items()}
    return ranks, alphas
