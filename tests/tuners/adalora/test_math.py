"""AdaLoRA's pure math against hand-computed values (float64)."""

import math

import pytest
import torch

from peft.tuners.adalora.allocation import (
    budget_at,
    kept_triplets,
    orthogonality_penalty,
    smooth_importance,
    triplet_scores,
)
from peft.tuners.adalora.layer import svd_delta

F64 = torch.float64


def test_budget_schedule_phases_and_cubic_values():
    # b0 = 24, bT = 8, tinit = 2, tfinal = 3, T = 12: shrinking over steps 3..9 (end = 9, span 7)
    args = dict(init_budget=24, target_budget=8, tinit=2, tfinal=3, total_step=12, delta_t=2)
    assert budget_at(0, **args) == (24, False)
    assert budget_at(2, **args) == (24, False)  # warm-up includes tinit
    # step 3: 16 * (1 - 1/7)^3 + 8 = 16 * 216/343 + 8 = 18.0758... -> 18; 3 % 2 != 0: no mask
    assert budget_at(3, **args) == (18, False)
    # step 4: 16 * (5/7)^3 + 8 = 16 * 125/343 + 8 = 13.830... -> 13; masked (4 % 2 == 0)
    assert budget_at(4, **args) == (13, True)
    # step 9 (= T - tfinal): remaining 0 -> target
    assert budget_at(9, **args) == (8, False)
    assert budget_at(10, **args) == (8, True)  # final phase: always masked, target budget
    assert budget_at(12, **args) == (8, True)


def test_budget_is_monotone_and_ends_at_target():
    args = dict(init_budget=100, target_budget=40, tinit=5, tfinal=10, total_step=100, delta_t=1)
    budgets = [budget_at(t, **args)[0] for t in range(101)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert budgets[0] == 100 and budgets[90] == 40 and budgets[100] == 40
    t = 50  # closed form at one inner step
    assert budgets[t] == int(60 * (1 - (t - 5) / 85) ** 3 + 40)


def test_importance_ema_against_hand_values():
    ipt = torch.tensor([0.0, 1.0], dtype=F64)
    unc = torch.tensor([0.0, 0.5], dtype=F64)
    sens = torch.tensor([2.0, 3.0], dtype=F64)
    new_ipt, new_unc = smooth_importance(ipt, unc, sens, beta1=0.8, beta2=0.9)
    # Ibar = 0.8 * [0, 1] + 0.2 * [2, 3] = [0.4, 1.4]
    torch.testing.assert_close(new_ipt, torch.tensor([0.4, 1.4], dtype=F64))
    # Ubar = 0.9 * [0, 0.5] + 0.1 * |[2, 3] - [0.4, 1.4]| = [0.16, 0.45 + 0.16] = [0.16, 0.61]
    torch.testing.assert_close(new_unc, torch.tensor([0.16, 0.61], dtype=F64))


def test_triplet_scores_are_value_plus_mean_row_and_column():
    score_a = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0]], dtype=F64)  # (r=2, n=3)
    score_e = torch.tensor([[10.0], [20.0]], dtype=F64)
    score_b = torch.tensor([[4.0, 1.0], [0.0, 3.0]], dtype=F64)  # (m=2, r=2)
    # triplet 0: 10 + mean(1, 3, 2) + mean(4, 0) = 10 + 2 + 2 = 14; triplet 1: 20 + 2 + 2 = 24
    torch.testing.assert_close(triplet_scores(score_a, score_e, score_b), torch.tensor([14.0, 24.0], dtype=F64))


def test_kept_triplets_keeps_the_budget_best_over_all_layers():
    scores = [torch.tensor([5.0, 1.0, 3.0]), torch.tensor([4.0, 0.5])]
    keeps = kept_triplets(scores, budget=3)  # drop the 2 smallest: 0.5 and 1.0
    assert [k.tolist() for k in keeps] == [[True, False, True], [True, False]]
    keeps = kept_triplets(scores, budget=1)
    assert [k.tolist() for k in keeps] == [[True, False, False], [False, False]]
    keeps = kept_triplets(scores, budget=10)  # at or above the total: keep all
    assert all(k.all() for k in keeps)


def test_orthogonality_penalty_closed_form():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=F64)  # A A^T = diag(1, 4): ||diag(0, 3)|| = 3
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64)  # B^T B = [[1, 1], [1, 1]]: ||[[0, 1], [1, 0]]|| = sqrt 2
    value = orthogonality_penalty([(a, b)])
    assert value.item() == pytest.approx((3 + math.sqrt(2)) / 2)
    q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=F64))  # orthonormal columns: zero penalty
    assert orthogonality_penalty([(q.T.contiguous(), q)]).item() == pytest.approx(0.0, abs=1e-12)
    assert orthogonality_penalty([]).item() == 0.0


def test_svd_delta_is_sum_of_scaled_rank_one_terms():
    torch.manual_seed(0)
    a, e, b = torch.randn(3, 4, dtype=F64), torch.randn(3, 1, dtype=F64), torch.randn(5, 3, dtype=F64)
    ranknum = torch.tensor([3.0], dtype=F64)
    expected = sum(e[i, 0] * torch.outer(b[:, i], a[i]) for i in range(3)) * 2.0 / (3.0 + 1e-5)
    torch.testing.assert_close(svd_delta(a, e, b, 2.0, ranknum), expected)
