"""Tied-LoRA's pure math (peft.tuners.tiedlora.tied_math) in float64 against closed forms."""

from __future__ import annotations

import torch

from peft.tuners.tiedlora.tied_math import shape_group, tied_delta_weight, tied_update


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    u, v = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    return A, B, u, v


def test_delta_weight_is_s_diag_v_B_diag_u_A():
    A, B, u, v = _tensors()
    torch.testing.assert_close(tied_delta_weight(A, B, u, v, 0.5), 0.5 * torch.diag(v) @ B @ torch.diag(u) @ A,
                               rtol=0, atol=1e-13)
    torch.testing.assert_close(tied_delta_weight(A, B, None, None, 2.0), 2.0 * B @ A, rtol=0, atol=1e-13)
    i, j = 4, 1  # element-wise: s v_i sum_k B_ik u_k A_kj
    expected = 0.5 * sum(float(v[i] * B[i, k] * u[k] * A[k, j]) for k in range(3))
    assert abs(float(tied_delta_weight(A, B, u, v, 0.5)[i, j]) - expected) < 1e-12


def test_update_equals_delta_times_x():
    A, B, u, v = _tensors(1)
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for uu, vv in ((u, v), (None, None), (u, None)):
        torch.testing.assert_close(tied_update(x, A, B, uu, vv, 0.25), x @ tied_delta_weight(A, B, uu, vv, 0.25).T,
                                   rtol=0, atol=1e-12)


def test_shape_group_names_out_by_in():
    assert shape_group(in_features=6, out_features=5) == "5x6"
