"""AdaLoRA's budget math as pure functions (Zhang et al., ICLR 2023, sections 3.1-3.3).

Notation: a layer's update is `P diag(lambda) Q`, stored as `lora_B` (P, m x r), `lora_E` (lambda, r x 1) and
`lora_A` (Q, r x n). Triplet i of a layer is (P[:, i], lambda_i, Q[i, :]).

- sensitivity of a parameter w: `I = |w * dL/dw|`;
- smoothed sensitivity `Ibar_t = beta1 Ibar_{t-1} + (1 - beta1) I_t`;
- uncertainty `Ubar_t = beta2 Ubar_{t-1} + (1 - beta2) |I_t - Ibar_t|`;
- score `s = Ibar * Ubar`; triplet score `S_i = s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki)`;
- budget `b(t)`: `b0` for `t <= tinit`, `bT + (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3` (truncated to an
  int) up to `T - tfinal`, `bT` after, with `b0 = init_r * n`, `bT = target_r * n`.
"""

from __future__ import annotations

import torch


def budget_at(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
              delta_t: int) -> tuple[int, bool]:
    """(total rank budget at `step`, whether the triplets are masked at this step). Masking happens every `delta_t`
    steps of the shrinking phase and at every step after it."""
    if step <= tinit:
        return init_budget, False
    end = total_step - tfinal
    if step > end:
        return target_budget, True
    remaining = 1 - (step - tinit) / (end - tinit)
    return int((init_budget - target_budget) * remaining**3 + target_budget), step % delta_t == 0


def smooth_importance(ipt_avg: torch.Tensor, unc_avg: torch.Tensor, sensitivity: torch.Tensor, beta1: float,
                      beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step: returns the new `(Ibar, Ubar)`; the uncertainty uses the new `Ibar`."""
    ipt_avg = beta1 * ipt_avg + (1 - beta1) * sensitivity
    unc_avg = beta2 * unc_avg + (1 - beta2) * (sensitivity - ipt_avg).abs()
    return ipt_avg, unc_avg


def triplet_scores(score_a: torch.Tensor, score_e: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """`S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`; `score_a` (r, n), `score_e` (r, 1), `score_b`
    (m, r) -> (r,)."""
    return score_e.reshape(-1) + score_a.mean(dim=1) + score_b.mean(dim=0)


def kept_triplets(scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Boolean keep masks, one per layer, so that about `budget` triplets survive over all layers: a triplet is
    masked when its score is at or below the `(total - budget)`-th smallest score (ties can mask a few more, as in
    the reference implementation). A budget at or above the total keeps everything."""
    flat = torch.cat([s.reshape(-1) for s in scores]) if scores else torch.zeros(0)
    drop = flat.numel() - budget
    if drop <= 0:
        return [torch.ones_like(s, dtype=torch.bool).reshape(-1) for s in scores]
    threshold = torch.kthvalue(flat, drop).values
    return [s.reshape(-1) > threshold for s in scores]


def orthogonality_penalty(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over the matrices of `||A A^T - I||_F` and `||B^T B - I||_F` for each `(A (r, n), B (m, r))` pair: the
    reference implementation's form of the paper's R(P, Q) (norms, not squared norms, averaged over matrices);
    0 with none."""
    norms = []
    for a, b in factors:
        for gram in (a @ a.T, b.T @ b):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            norms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).mean()
