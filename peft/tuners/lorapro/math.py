"""LoRA-Pro math (Wang, Liang, He, Wang, Tan, ICLR 2025, arXiv 2407.18242) as small pure tensor functions.

Notation: the adapted weight is `W' = W + s B A` with `A` (r, n), `B` (m, r), scale `s`; `g = dL/dW` (m, n) is
never formed by the training code. Plain LoRA gradients are `gA = s B^T g` (r, n) and `gB = s g A^T` (m, r)
(paper eq. 3). One step along `(gA', gB')` moves W, to first order, by the *equivalent gradient*

    g~ = s B gA' + s gB' A                                                              (paper eq. 5)

LoRA-Pro picks `gA', gB'` minimising `|| g~ - g ||_F` (Theorem 2.1):

    gA' = (1/s^2) (B^T B)^-1 gA + X A
    gB' = (1/s^2) (I - B (B^T B)^-1 B^T) gB (A A^T)^-1 - B X                            (paper eq. 8)

for any r x r matrix X; `g~` is then the projection of `g` onto the tangent space of the rank-r matrices at `BA`,
`P_B g + (I - P_B) g P_A`, whatever X is. X is chosen to keep `(gA', gB')` closest to `(gA, gB)` (Theorem 2.3):

    (B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^-1 gA A^T                                  (paper eq. 10)

Numerics: the adjustment's r x r work (paper eq. 8 and 10: the Gram matrices, formed from fp64 copies of A and B,
their inverses, the Sylvester solve, the r x r products with the gradients, and `gA'`) is done in float64
(`solve_dtype`), its results returned in the compute dtype (fp32, or fp64 for fp64 inputs); the (m, r) products of
`gB'` and the m x n work (`g~`, the Adam direction U, `B^T U`, `U A^T`) stay in the compute dtype. Right after B
leaves zero, `B^T B` is ill-conditioned (B's columns follow the gradient's few strong directions), and fp32 solves
there lost up to most of the step's digits (docs/lorapro.md, "Precision"); next to the m x n work the fp64 part
costs little.

- the Gram matrices `B^T B`, `A A^T` get `damping * I` added and are inverted through their symmetric
  eigendecompositions; eigenvalues at or below `max(r * eps * lambda_max, sqrt(tiny))` count as zero (a
  pseudo-inverse), so a zero B (the first step after LoRA's init) gives exactly `gA' = 0`,
  `gB' = (1/s^2) gB (A A^T)^-1`, and a rank-deficient A or a tiny B gives finite numbers;
- the projector is applied as `Y - B ((B^T B)^-1 (B^T Y))`: no m x m matrix is ever formed.

Batches: every function takes stacks too, A (..., r, n), B (..., m, r) and the gradients alike, for layers of one
shape (the optimizer steps them together: on a GPU the step is bound by kernel launches, not by flops). Each
matrix of a stack is computed as it would be alone (floors included: they are per matrix).

Row shards (FSDP2 shards B on its m rows): B, gB and the (m, n) moments may be this process's rows only, with A
and gA whole (gathered: (r, n) is small), when the functions get `row_sum`, a function summing a tensor over the
processes (an all-reduce), and the Grams the summed `B^T B` (`grams_batched(..., b_grams=)`). Every product that
contracts over m (`B^T B`, `B^T gB`, `B^T U`) is a sum over the row shards, so it is formed from the local rows and
summed: r x r or r x n numbers; everything with an m dimension (gB', g~, U, the moments) is row-local, computed
from the local rows and the whole (r, ...) matrices exactly as the single-process rows are. `a_rows`: the rows of A
this process updates (its shard of A). `row_sum=None` is one process, where the sums are the local products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch

XMode = Literal["sylvester", "zero", "symmetric"]
X_MODES: tuple[str, ...] = ("sylvester", "zero", "symmetric")
RowSum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over B's row shards (an all-reduce)
ALL_ROWS = slice(None)


def _summed(t: torch.Tensor, row_sum: Optional[RowSum]) -> torch.Tensor:
    """`t` (a product contracting over m, from this process's rows of B) summed over the row shards."""
    return t if row_sum is None else row_sum(t)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def solve_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the adjustment's r x r work: float64, or float32 on a device without float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


# --- r x r Gram matrices ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grams:
    """Eigendecompositions `B^T B + dI = Qb diag(lb) Qb^T` and `A A^T + dI = Qa diag(la) Qa^T` (all (..., r, r) /
    (..., r)), and the two pseudo-inverses they give, `binv = (B^T B + dI)^+`, `ainv = (A A^T + dI)^+`, in
    `solve_dtype`."""

    qb: torch.Tensor  # (..., r, r)
    lb: torch.Tensor  # (..., r)
    qa: torch.Tensor  # (..., r, r)
    la: torch.Tensor  # (..., r)
    binv: torch.Tensor  # (..., r, r)
    ainv: torch.Tensor  # (..., r, r)

    def inv_b(self, y: torch.Tensor) -> torch.Tensor:
        """`(B^T B + dI)^+ y` for y (..., r, k)."""
        return self.binv @ y

    def inv_a_right(self, y: torch.Tensor) -> torch.Tensor:
        """`y (A A^T + dI)^+` for y (..., k, r)."""
        return y @ self.ainv

    def rows(self, start: int, stop: int, batch: torch.Size) -> "Grams":
        """Matrices `start:stop` of a flat stack (fields (K, r, r) / (K, r)), shaped `batch + (r, r)` / `(r,)`."""
        return Grams(*(t[start:stop].reshape(*batch, *t.shape[1:]) for t in (
            self.qb, self.lb, self.qa, self.la, self.binv, self.ainv)))


def _floor(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eigenvalues at or below this count as zero: `max(r * eps * scale, sqrt(tiny))`; values (..., r) or
    (..., r, r), scale broadcastable (one per matrix)."""
    info = torch.finfo(values.dtype)
    return torch.clamp(values.shape[-1] * info.eps * scale, min=math.sqrt(info.tiny))


def _pinv_values(lam: torch.Tensor) -> torch.Tensor:
    """`1 / lam` where lam (..., r) is above its matrix's floor, 0 elsewhere (pseudo-inverse of a symmetric PSD
    matrix)."""
    keep = lam > _floor(lam, lam.amax(-1, keepdim=True))
    return torch.where(keep, lam.reciprocal(), 0.0)  # lam >= 0: an inf from 1/0 is never selected


def _pinv(q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """`Q diag(lam^+) Q^T` (..., r, r): the pseudo-inverse of the symmetric PSD matrix `Q diag(lam) Q^T`."""
    return (q * _pinv_values(lam)[..., None, :]) @ q.mT


def _decompose(mats: torch.Tensor, damping: float | torch.Tensor) -> Grams:
    """Grams from stacked Gram matrices `mats` (2, ..., r, r) = [B^T B, A A^T]: one batched `eigh` call; `damping`
    a float or a tensor broadcastable to (..., r) (one value per matrix)."""
    lam, q = torch.linalg.eigh(0.5 * (mats + mats.mT))  # exact symmetry; (2, ..., r), (2, ..., r, r)
    lam = lam.clamp(min=0.0) + damping
    return Grams(qb=q[0], lb=lam[0], qa=q[1], la=lam[1], binv=_pinv(q[0], lam[0]), ainv=_pinv(q[1], lam[1]))


def grams(A: torch.Tensor, B: torch.Tensor, damping: float = 0.0) -> Grams:
    """Eigendecompose `B^T B + dI` and `A A^T + dI` (d = damping >= 0), in `solve_dtype`. A (..., r, n),
    B (..., m, r); a stack is decomposed by one batched `eigh` call."""
    dtype = solve_dtype(A.device)
    A, B = A.to(dtype), B.to(dtype)  # the Grams of fp32 factors formed in fp64: their small eigenvalues survive
    return _decompose(torch.stack([B.mT @ B, A @ A.mT]), damping)  # (2, ..., r, r)


def _per_matrix(dampings: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """One damping per matrix of a flat stack: a float when all are equal (the usual case), else (K, 1)."""
    if len(set(dampings)) == 1:
        return dampings[0]
    return torch.tensor(dampings, dtype=like.dtype, device=like.device)[:, None]


def gram_b(B: torch.Tensor) -> torch.Tensor:
    """`B^T B` (..., r, r) in `solve_dtype` for B (..., m, r): with B's rows sharded, this process's share of it."""
    B = B.to(solve_dtype(B.device))
    return B.mT @ B


def grams_batched(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], dampings: Sequence[float],
    b_grams: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> list[Grams]:
    """`grams(A, B, d)` for many (A (..., r, n), B (..., m, r), d) at once (stacks allowed), in `solve_dtype`.

    The Gram matrices of all the pairs that share r and device are stacked, `(2, K, r, r)`, and decomposed by
    one batched `eigh` call: on a GPU one solver launch and one synchronisation for all the layers of a model instead
    of two per layer (each `eigh` call waits for its error check). `b_grams`: `B^T B` (..., r, r) per pair, or None
    to form it from B (given: B is a row shard and this is the sum of `gram_b` over the shards)."""
    if len(factors) != len(dampings):
        raise ValueError(f"Got {len(factors)} factor pairs and {len(dampings)} dampings; expected one per pair.")
    b_grams = [None] * len(factors) if b_grams is None else list(b_grams)
    groups: dict[tuple, list[int]] = {}
    for i, (A, _) in enumerate(factors):
        groups.setdefault((A.shape[-2], A.device), []).append(i)
    out: list[Grams | None] = [None] * len(factors)
    for (_, device), index in groups.items():
        dtype = solve_dtype(device)
        As = [factors[i][0].to(dtype) for i in index]
        bbs = [gram_b(factors[i][1]) if b_grams[i] is None else b_grams[i].to(dtype) for i in index]
        r, batches = As[0].shape[-2], [A.shape[:-2] for A in As]
        mats = torch.stack([torch.cat([bb.reshape(-1, r, r) for bb in bbs]),  # (2, K, r, r)
                            torch.cat([(A @ A.mT).reshape(-1, r, r) for A in As])])
        per_matrix = [dampings[i] for i, batch in zip(index, batches) for _ in range(batch.numel())]
        g, start = _decompose(mats, _per_matrix(per_matrix, mats)), 0  # fields (K, r, r) / (K, r)
        for i, batch in zip(index, batches):
            out[i], start = g.rows(start, start + batch.numel(), batch), start + batch.numel()
    return out  # type: ignore[return-value]


def _local_grams(A: torch.Tensor, B: torch.Tensor, damping: float, row_sum: Optional[RowSum]) -> Grams:
    """`grams(A, B, damping)`, with `B^T B` summed over B's row shards when `row_sum` is given."""
    if row_sum is None:
        return grams(A, B, damping)
    return grams_batched([(A, B)], [damping], [row_sum(gram_b(B))])[0]


def solve_sylvester(g: Grams, C: torch.Tensor) -> torch.Tensor:
    """X (..., r, r) with `(B^T B + dI) X + X (A A^T + dI) = C` (paper eq. 10 when C is its right-hand side).

    With both Grams diagonalised, `X = Qb [(Qb^T C Qa)_ij / (lb_i + la_j)] Qa^T`; a denominator at or below the
    floor (both Grams singular in that direction) gives 0 there: the minimum-norm least-squares solution."""
    denom = g.lb[..., :, None] + g.la[..., None, :]  # (..., r, r)
    keep = denom > _floor(denom, denom.amax((-2, -1), keepdim=True))  # floor per matrix
    inv = torch.where(keep, denom.reciprocal(), 0.0)  # denom >= 0: an inf from 1/0 is never selected
    return g.qb @ ((g.qb.mT @ C @ g.qa) * inv) @ g.qa.mT


# --- gradients ---------------------------------------------------------------------------------------------------
def lora_gradients(A: torch.Tensor, B: torch.Tensor, g: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA gradients a full gradient g (..., m, n) induces: `gA = s B^T g` (..., r, n), `gB = s g A^T` (..., m, r)
    (eq. 3)."""
    return s * (B.mT @ g), s * (g @ A.mT)


def choose_x(
    A: torch.Tensor, gA: torch.Tensor, s: float, g: Grams, x_mode: XMode = "sylvester"
) -> torch.Tensor:
    """The free r x r matrix X of eq. 8.

    - "sylvester": the solution of eq. 10 (Theorem 2.3): `(gA', gB')` closest to `(gA, gB)` in Frobenius norm.
    - "zero": X = 0 (A takes the whole `P_B g` part of the update, B the rest).
    - "symmetric": `X = -(1/(2 s^2)) (B^T B)^-1 gA A^T (A A^T)^-1`, which splits the part of the update that both
      factors can produce, `P_B g P_A`, equally between `s B gA'` and `s gB' A`.
    """
    if x_mode == "zero":
        return torch.zeros_like(g.qb)
    rhs = -(1.0 / s**2) * g.inv_b(gA @ A.mT)  # (..., r, r)
    if x_mode == "sylvester":
        return solve_sylvester(g, rhs)
    if x_mode == "symmetric":
        return 0.5 * g.inv_a_right(rhs)
    raise ValueError(f"Invalid x_mode={x_mode!r}: expected one of {X_MODES}.")


def _addmm(x: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """`beta x + alpha m1 @ m2` in one kernel: `addmm` for matrices, `baddbmm` for stacks (same leading dims)."""
    if x.dim() == 2:
        return torch.addmm(x, m1, m2, beta=beta, alpha=alpha)
    batch = x.shape[:-2]
    flat = [t.reshape(-1, *t.shape[-2:]) for t in (x, m1, m2)]  # (k, ., .)
    return torch.baddbmm(*flat, beta=beta, alpha=alpha).reshape(*batch, *x.shape[-2:])


def adjust(
    g: Grams, A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float,
    x_mode: XMode = "sylvester", row_sum: Optional[RowSum] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper eq. 8 with the Grams of (A, B) already decomposed; all inputs in one compute dtype, the result in it
    too. Returns `(gA' (..., r, n), gB' (..., m, r))`, with `Binv = (B^T B)^+`, `Ainv = (A A^T)^+` (damped):

        gA' = (1/s^2) Binv gA + X A
        gB' = (1/s^2) (gB - B Binv B^T gB) Ainv - B X = (1/s^2) gB Ainv - B ((1/s^2) Binv (B^T gB) Ainv + X)

    The projector is applied as `Y - B (Binv (B^T Y))` with its (r, r) parts grouped first: no (m, m) matrix, and
    four products with a dimension m or n (besides those of `choose_x`). Row shards (`row_sum`, module docstring):
    `B^T gB` is summed; gA' comes out whole, gB' row-local.

    Precision: everything up to the (r, r) matrices X and `inner = (1/s^2) Binv (B^T gB) Ainv + X`, and gA' (where
    `Binv`, large when B is nearly rank-deficient, meets the (r, n) gradient), is computed in the Grams' dtype
    (`solve_dtype`, fp64); the two (m, r) products of gB' take `inner` and `Ainv` rounded to the compute dtype (as
    accurate there, measured, and the (m, r) work is the larger when m > n)."""
    out = A.dtype
    A64, B64, gA64, gB64 = (t.to(g.binv.dtype) for t in (A, B, gA, gB))
    X = choose_x(A64, gA64, s, g, x_mode)  # (..., r, r)
    new_gA = _addmm(X @ A64, g.binv, gA64, alpha=1.0 / s**2)  # (..., r, n)
    inner = g.binv @ _summed(B64.mT @ gB64, row_sum) @ g.ainv / s**2 + X  # (..., r, r)
    new_gB = _addmm(B @ inner.to(out), gB, g.ainv.to(out), beta=-1.0, alpha=1.0 / s**2)  # (..., m, r)
    return new_gA.to(out), new_gB


def adjusted_gradients(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float,
    x_mode: XMode = "sylvester", damping: float = 0.0, g: Grams | None = None, row_sum: Optional[RowSum] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted gradients (paper eq. 8 with X from `choose_x`): returns `(gA' (..., r, n), gB' (..., m, r))`.

    Inputs may be any float dtype; the result is in `compute_dtype` (fp32, or fp64 for fp64 inputs). `g`: the
    Grams of (A, B) with `damping` if already decomposed (`grams_batched`)."""
    dtype = compute_dtype(A, B, gA, gB)
    A, B, gA, gB = (t.to(dtype) for t in (A, B, gA, gB))
    return adjust(_local_grams(A, B, damping, row_sum) if g is None else g, A, B, gA, gB, s, x_mode, row_sum)


def equivalent_gradient(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float
) -> torch.Tensor:
    """`g~ = s B gA + s gB A` (..., m, n): the first-order change of W per unit step along (gA, gB) (paper eq. 5).

    Computed as one product `(s [B, gB]) [gA; A]` ((m, 2r) times (2r, n)): the only (m, n) tensor made."""
    dtype = compute_dtype(A, B, gA, gB)
    left = torch.cat([B.to(dtype), gB.to(dtype)], dim=-1).mul_(s)  # (..., m, 2r)
    return left @ torch.cat([gA.to(dtype), A.to(dtype)], dim=-2)  # (..., m, n)


def projected_gradient(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float, damping: float = 0.0
) -> torch.Tensor:
    """The equivalent gradient of the adjusted gradients (m, n), from the plain LoRA gradients alone.

    Equals `P_B g + (I - P_B) g P_A` (the tangent-space projection of g) and does not depend on X, so it is
    computed with X = 0: `(1/s) B (B^T B)^-1 gA + (1/s) (I - P_B) gB (A A^T)^-1 A`."""
    new_gA, new_gB = adjusted_gradients(A, B, gA, gB, s, "zero", damping)
    return equivalent_gradient(A, B, new_gA, new_gB, s)


# --- Adam ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdamHyper:
    """AdamW hyperparameters of one step: learning rate, betas, eps, decoupled weight decay."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def adam_direction(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, step: int, hp: AdamHyper,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update the fp32 moments in place with `grad` and return `U = m_hat / (sqrt(v_hat) + eps)`.

    `m <- b1 m + (1 - b1) grad`, `v <- b2 v + (1 - b2) grad^2`, `m_hat = m / (1 - b1^t)`, `v_hat = v / (1 - b2^t)`
    with `t = step` counted from 1 (the bias correction is exact at the first step). U is written into `out` when
    given (a tensor of the moments' shape and dtype, `grad` itself allowed: it is read before U is written)."""
    if step < 1:
        raise ValueError(f"Invalid step={step!r}: expected a step count starting at 1.")
    grad = grad.to(exp_avg.dtype)
    exp_avg.lerp_(grad, 1.0 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(grad, grad, value=1.0 - hp.beta2)
    # m_hat / (sqrt(v_hat) + eps) = (sqrt(1 - b2^t) / (1 - b1^t)) m / (sqrt(v) + sqrt(1 - b2^t) eps): three passes
    # over (m, n) after the moments', with one (m, n) temporary, or none with `out` (large in full mode)
    root_bc2 = math.sqrt(1.0 - hp.beta2**step)
    denom = torch.sqrt(exp_avg_sq, out=out).add_(hp.eps * root_bc2)
    return torch.div(exp_avg, denom, out=denom).mul_(root_bc2 / (1.0 - hp.beta1**step))


def decoupled_update(param: torch.Tensor, direction: torch.Tensor, hp: AdamHyper) -> torch.Tensor:
    """`p - lr (direction + weight_decay p)` in the compute dtype (AdamW's decoupled weight decay)."""
    p = param.to(direction.dtype)
    return p - hp.lr * (direction + hp.weight_decay * p)


def _full_space_direction(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float,
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, hp: AdamHyper,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of `full_mode_step` before the second adjustment, for (adjusted) gA, gB: the LoRA gradients
    `(s B^T U, s U A^T)` of the Adam direction U of `g~ = s B gA + s gB A` (moments updated in place). With B's rows
    sharded, g~, U and the moments are row-local and `s B^T U` is this process's share (summed by the caller)."""
    g_tilde = equivalent_gradient(A, B, gA, gB, s)  # (..., m, n), X-free (projection)
    in_place = g_tilde if g_tilde.dtype == exp_avg.dtype else None  # U overwrites g~ (read first): no 2nd (m, n)
    U = adam_direction(exp_avg, exp_avg_sq, g_tilde, step, hp, out=in_place).to(A.dtype)  # (..., m, n)
    return lora_gradients(A, B, U, s)


def full_mode_step(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float,
    exp_avg: torch.Tensor | Sequence[torch.Tensor], exp_avg_sq: torch.Tensor | Sequence[torch.Tensor], step: int,
    hp: AdamHyper, x_mode: XMode = "sylvester", damping: float = 0.0, g: Grams | None = None,
    row_sum: Optional[RowSum] = None, a_rows: slice = ALL_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the paper's Algorithm 2 (LoRA-Pro with AdamW): returns the new `(A, B)` in the compute dtype.

    1. `g~` = the equivalent gradient of the adjusted `(gA, gB)` (m, n);
    2. Adam moments of `g~` in the full (m, n) space (fp32; updated in place), `U = m_hat / (sqrt(v_hat) + eps)`;
    3. U is treated as the full gradient: `gA_U = s B^T U`, `gB_U = s U A^T`, adjusted again (eq. 8, X per x_mode);
    4. `A <- A - lr (gA_U' + wd A)`, `B <- B - lr (gB_U' + wd B)`.

    `g`: the Grams of (A, B) with `damping` if already decomposed (`grams_batched`). For a stack of k pairs
    (A (k, r, n), ...) the moments may be two sequences of k (m, n) tensors: steps 1-3 then run one pair at a time
    (no (k, m, n) tensor is made), the adjustments and the update once for the stack.

    Row shards (module docstring): B, gB and the moments this process's rows, A and gA whole, `g` from the summed
    `B^T B`; returns this process's rows of A (`a_rows`) and of B. Three sums per step: `B^T gB` twice (r, r) and
    `B^T U` (r, n), one each for the whole stack."""
    dtype = compute_dtype(A, B, gA, gB)
    A, B, gA, gB = (t.to(dtype) for t in (A, B, gA, gB))
    if g is None:  # A and B do not change within the step: one decomposition serves both adjustments
        g = _local_grams(A, B, damping, row_sum)
    gA, gB = adjust(g, A, B, gA, gB, s, "zero", row_sum)  # gA' whole, gB' row-local
    if isinstance(exp_avg, torch.Tensor):
        uA, uB = _full_space_direction(A, B, gA, gB, s, exp_avg, exp_avg_sq, step, hp)
    else:
        pairs = [_full_space_direction(*args, s, m, v, step, hp)
                 for *args, m, v in zip(A, B, gA, gB, exp_avg, exp_avg_sq, strict=True)]
        uA, uB = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (k, r, n), (k, m, r)
    new_gA, new_gB = adjust(g, A, B, _summed(uA, row_sum), uB, s, x_mode, row_sum)
    return decoupled_update(A[..., a_rows, :], new_gA[..., a_rows, :], hp), decoupled_update(B, new_gB, hp)


def efficient_mode_step(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float,
    moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], step: int, hp: AdamHyper,
    x_mode: XMode = "sylvester", damping: float = 0.0, g: Grams | None = None,
    row_sum: Optional[RowSum] = None, a_rows: slice = ALL_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjust once (eq. 8), then ordinary AdamW on each factor: LoRA's memory (moments (r, n) and (m, r)).

    `moments` = (exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B), fp32, updated in place; `g` as in
    `full_mode_step`. Row shards as there: the moments of A are those of its rows `a_rows`, B's of its local rows;
    one sum per step (`B^T gB`)."""
    new_gA, new_gB = adjusted_gradients(A, B, gA, gB, s, x_mode, damping, g, row_sum)
    dir_A = adam_direction(moments[0], moments[1], new_gA[..., a_rows, :], step, hp).to(new_gA.dtype)
    dir_B = adam_direction(moments[2], moments[3], new_gB, step, hp).to(new_gB.dtype)
    return decoupled_update(A[..., a_rows, :], dir_A, hp), decoupled_update(B, dir_B, hp)
