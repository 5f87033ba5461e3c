"""VeRA's pure math (peft.tuners.vera.projections) in float64 against closed forms, and the projection draws
against upstream PEFT 0.21.2's generator bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from peft.tuners.vera.projections import draw_projections, kaiming_uniform_bound, vera_delta_weight, vera_update


def test_delta_weight_is_diag_b_B_diag_d_A_sliced():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, generator=g, dtype=torch.float64)
    B = torch.randn(9, 3, generator=g, dtype=torch.float64)
    d = torch.randn(3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    expected = torch.diag(b) @ B[:5, :] @ torch.diag(d) @ A[:, :4]
    delta = vera_delta_weight(A, B, d, b, in_features=4)
    assert delta.shape == (5, 4)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-13)
    # element-wise closed form: delta[i, j] = b_i sum_k B[i, k] d_k A[k, j]
    i, j = 2, 3
    assert math.isclose(float(delta[i, j]), float(sum(b[i] * B[i, k] * d[k] * A[k, j] for k in range(3))),
                        abs_tol=1e-12)


def test_update_equals_delta_weight_times_x():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    d, b = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    expected = x @ vera_delta_weight(A, B, d, b, in_features=6).T
    torch.testing.assert_close(vera_update(x, A, B, d, b), expected, rtol=0, atol=1e-12)
    x_small = x[..., :2]  # a narrower layer uses A[:, :2]
    torch.testing.assert_close(vera_update(x_small, A, B, d, b), x_small @ vera_delta_weight(A, B, d, b, 2).T)


def test_draws_are_deterministic_and_bounded():
    A, B = draw_projections(7, r=4, in_max=50, out_max=30)
    A2, B2 = draw_projections(7, r=4, in_max=50, out_max=30)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    assert A.shape == (4, 50) and B.shape == (30, 4) and A.dtype == torch.get_default_dtype()
    assert A.abs().max() <= math.sqrt(6 / 50) and B.abs().max() <= math.sqrt(6 / 4)
    assert not torch.equal(draw_projections(8, 4, 50, 30)[0], A)
    assert math.isclose(kaiming_uniform_bound(50), math.sqrt(6 / 50), rel_tol=1e-12)


UPSTREAM_DRAW = """
import sys, torch
from peft.tuners.vera.model import _kaiming_init
out = {}
for key, r, i, o, dtype in [(0, 4, 16, 8, "float32"), (123, 8, 33, 70, "float32"), (5, 3, 10, 12, "float64")]:
    torch.set_default_dtype(getattr(torch, dtype))
    g = torch.Generator(device="cpu").manual_seed(key)
    A = _kaiming_init((r, i), generator=g)
    B = _kaiming_init((o, r), generator=g)
    out[f"{key}_{r}_{i}_{o}_{dtype}"] = (A, B)
torch.set_default_dtype(torch.float32)
torch.save(out, sys.argv[1])
emit({"ok": True})
"""


def test_projections_equal_upstream_bit_for_bit(tmp_path):
    pytest.importorskip("transformers")
    from tests.upstream_harness import run_upstream

    path = tmp_path / "draws.pt"
    run_upstream(UPSTREAM_DRAW, args=[str(path)])
    theirs = torch.load(path, weights_only=True)
    assert len(theirs) == 3
    for name, (A_up, B_up) in theirs.items():
        key, r, i, o, dtype = name.split("_")
        A, B = draw_projections(int(key), int(r), int(i), int(o), dtype=getattr(torch, dtype))
        assert A.dtype == A_up.dtype and torch.equal(A, A_up), name
        assert torch.equal(B, B_up), name
