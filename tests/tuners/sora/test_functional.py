"""SoRA's pure math (peft/tuners/sora/functional.py) against hand values and closed forms, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from peft.tuners.sora.functional import (
    compact_factors,
    proximal_gate_step,
    scheduled_lambda,
    soft_threshold,
    sora_delta_weight,
    surviving_components,
)

F64 = torch.float64


def test_soft_threshold_hand_values():
    x = torch.tensor([1.0, -1.0, 0.25, -0.25, 0.3, -0.7, 0.0], dtype=F64)
    got = soft_threshold(x, 0.3)
    want = torch.tensor([0.7, -0.7, 0.0, 0.0, 0.0, -0.4, 0.0], dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert (got[2:5] == 0).all() and not torch.signbit(got[2:5]).any()  # exactly +0.0, also at |x| == tau


def test_soft_threshold_is_the_l1_proximal_operator():
    """prox_{tau |.|}(v) = argmin_x 0.5 (x - v)^2 + tau |x|: brute force on a fine grid."""
    grid = torch.linspace(-3, 3, 600001, dtype=F64)
    for v in (-2.0, -0.4, 0.1, 0.9, 2.5):
        objective = 0.5 * (grid - v) ** 2 + 0.5 * grid.abs()
        best = grid[objective.argmin()].item()
        assert soft_threshold(torch.tensor([v], dtype=F64), 0.5).item() == pytest.approx(best, abs=1e-5)


def test_proximal_gate_step_hand_values():
    g = torch.tensor([1.0, -0.5, 0.02, -0.03, 0.2], dtype=F64)
    grad = torch.tensor([2.0, -1.0, 0.0, 0.1, -1.0], dtype=F64)
    lr, lam = 0.1, 0.5  # threshold 0.05
    # g - lr * grad = [0.8, -0.4, 0.02, -0.04, 0.3] -> shrink by 0.05
    want = torch.tensor([0.75, -0.35, 0.0, 0.0, 0.25], dtype=F64)
    torch.testing.assert_close(proximal_gate_step(g, lr, lam, grad), want, rtol=0, atol=1e-15)
    # proximal map only (after another optimizer's smooth step): [0.95, -0.45, 0, 0, 0.15]
    want_prox = torch.tensor([0.95, -0.45, 0.0, 0.0, 0.15], dtype=F64)
    torch.testing.assert_close(proximal_gate_step(g, lr, lam), want_prox, rtol=0, atol=1e-15)
    assert torch.equal(proximal_gate_step(g, lr, 0.0), g)  # lambda = 0: plain (no-op) map


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True])
def test_proximal_gate_step_refuses_bad_numbers(bad):
    g = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="Invalid lr="):
        proximal_gate_step(g, bad, 0.1)
    with pytest.raises(ValueError, match="Invalid sparsity_lambda="):
        proximal_gate_step(g, 0.1, bad)


def test_scheduled_lambda():
    assert scheduled_lambda(5, 0.2) == 0.2
    assert scheduled_lambda(1, 0.2, warmup_steps=2) == 0.0
    assert scheduled_lambda(2, 0.2, warmup_steps=2) == 0.2
    assert scheduled_lambda(5, 0.1, 0.3, 10, "linear") == pytest.approx(0.2)
    assert scheduled_lambda(50, 0.1, 0.3, 10, "linear") == pytest.approx(0.3)
    assert scheduled_lambda(5, 0.01, 1.0, 10, "exp_linear") == pytest.approx(0.1)
    want = math.log(math.exp(0.1) + 0.5 * (math.exp(0.3) - math.exp(0.1)))
    assert scheduled_lambda(5, 0.1, 0.3, 10, "log_linear") == pytest.approx(want)
    with pytest.raises(ValueError, match="Invalid schedule='cosine'"):
        scheduled_lambda(0, 0.1, schedule="cosine")
    with pytest.raises(ValueError, match="Invalid max_lambda=None"):
        scheduled_lambda(0, 0.1, schedule="linear")


def test_delta_weight_closed_form():
    gen = torch.Generator().manual_seed(0)
    A, B, g = (torch.randn(3, 5, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64),
               torch.tensor([0.5, 0.0, -2.0], dtype=F64))
    want = 0.7 * sum(g[j] * torch.outer(B[:, j], A[j]) for j in range(3))
    torch.testing.assert_close(sora_delta_weight(A, B, g, 0.7), want, rtol=0, atol=1e-13)
    torch.testing.assert_close(sora_delta_weight(A, B, g, 0.7, fan_in_fan_out=True), want.T, rtol=0, atol=1e-13)


def test_compact_factors_keeps_the_product():
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(5, 6, generator=gen, dtype=F64), torch.randn(4, 5, generator=gen, dtype=F64)
    g = torch.tensor([0.0, 1.5, 0.0, -0.3, 0.0], dtype=F64)
    assert surviving_components(g).tolist() == [1, 3]
    A2, B2, g2 = compact_factors(A, B, g)
    assert A2.shape == (2, 6) and B2.shape == (4, 2) and g2.tolist() == [1.5, -0.3]
    torch.testing.assert_close(sora_delta_weight(A2, B2, g2, 1.0), sora_delta_weight(A, B, g, 1.0),
                               rtol=0, atol=1e-14)
    A0, B0, g0 = compact_factors(A, B, torch.zeros(5, dtype=F64))  # all dead: one zero component
    assert A0.shape == (1, 6) and B0.shape == (4, 1) and g0.tolist() == [0.0]
    assert torch.count_nonzero(sora_delta_weight(A0, B0, g0, 1.0)) == 0
