"""LoKr's update in float64 against closed forms, and its dimension split against upstream's."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from peft import LoKrConfig, get_peft_model
from peft.tuners.lokr.math import kron_delta, lokr_shapes, split_dimension

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


@pytest.mark.parametrize("dim,factor,expected", [
    (256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)), (384, -1, (16, 24)),
    (10, 3, (2, 5)), (1, -1, (1, 1)), (8, 4, (4, 2)), (1536, 4, (4, 384)), (12, 100, (3, 4)),
])
def test_split_dimension_known_values(dim, factor, expected):
    assert split_dimension(dim, factor) == expected
    assert expected[0] * expected[1] == dim


@pytest.mark.upstream
def test_split_dimension_matches_upstream_everywhere():
    from tests.upstream_harness import run_upstream

    result = run_upstream('''
from peft.tuners.lokr.layer import factorization
emit([[d, f, list(factorization(d, f))] for d in range(1, 401) for f in [-1] + list(range(1, 25))])
''')
    mismatches = [(d, f, want) for d, f, want in result.data if list(split_dimension(d, f)) != want]
    assert not mismatches[:5]


def test_kron_delta_elementwise_2d_and_4d():
    a, c, b, d, s = 2, 3, 4, 2, 0.5
    w1, w2 = rand(a, c), rand(b, d)
    got = kron_delta(w1, w2, s)
    for i, j, k, q in itertools.product(range(a), range(c), range(b), range(d)):
        assert abs(got[i * b + k, j * d + q] - s * w1[i, j] * w2[k, q]) < 1e-12
    w2c = rand(b, d, 3, 2)
    got = kron_delta(w1, w2c, s)
    assert got.shape == (a * b, c * d, 3, 2)
    for i, j, k, q, u, v in itertools.product(range(a), range(c), range(b), range(d), range(3), range(2)):
        assert abs(got[i * b + k, j * d + q, u, v] - s * w1[i, j] * w2c[k, q, u, v]) < 1e-12


def _count(shapes):
    return sum(torch.Size(s).numel() for s in shapes.values())


def test_shapes_follow_the_rank_rules():
    # Linear 64 x 32: out 64 = 8 * 8, in 32 = 4 * 8
    s = lokr_shapes(64, 32, (), 2, -1, decompose_both=False, effective_conv=False)
    assert s == {"lokr_w1": (8, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert _count(s) == 8 * 4 + 2 * (8 + 8)
    s = lokr_shapes(64, 32, (), 2, -1, decompose_both=True, effective_conv=False)
    assert s == {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert lokr_shapes(64, 32, (), 4, -1, False, False) == {"lokr_w1": (8, 4), "lokr_w2": (8, 8)}  # r >= max/2
    conv = lokr_shapes(16, 8, (3, 3), 1, -1, False, effective_conv=False)
    assert conv == {"lokr_w1": (4, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4 * 9)}
    eff = lokr_shapes(16, 8, (3, 3), 1, -1, False, effective_conv=True)
    assert eff == {"lokr_w1": (4, 2), "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 4), "lokr_t2": (1, 1, 3, 3)}
    assert lokr_shapes(16, 8, (3, 3), 4, -1, False, True)["lokr_w2"] == (4, 4, 3, 3)


def _layer(model):
    return next(m for m in model.modules() if hasattr(m, "lokr_w1"))


def test_linear_forward_closed_form():
    base = torch.nn.Sequential(torch.nn.Linear(6, 8)).double()  # out 8 = 2 * 4, in 6 = 2 * 3
    model = get_peft_model(base, LoKrConfig(r=1, alpha=3, init_weights=False, target_modules=["0"]))
    layer, x = _layer(model), rand(5, 6)
    w1 = layer.lokr_w1["default"].detach()
    w2 = layer.lokr_w2_a["default"].detach() @ layer.lokr_w2_b["default"].detach()
    assert w1.shape == (2, 2) and w2.shape == (4, 3)
    delta = torch.zeros(8, 6, dtype=torch.float64)
    for i, j, k, q in itertools.product(range(2), range(2), range(4), range(3)):
        delta[i * 4 + k, j * 3 + q] = 3.0 * w1[i, j] * w2[k, q]
    bl = layer.get_base_layer()
    with torch.no_grad():
        assert torch.allclose(model(x), x @ (bl.weight + delta).T + bl.bias, atol=1e-12)


def test_effective_conv_forward_closed_form():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)  # out 16 = 4 * 4, in 8 = 2 * 4
    model = get_peft_model(torch.nn.Sequential(conv).double(), LoKrConfig(
        r=1, alpha=2, init_weights=False, use_effective_conv2d=True, target_modules=["0"]))
    layer, x = _layer(model), rand(2, 8, 5, 5)
    w1, t2 = layer.lokr_w1["default"].detach(), layer.lokr_t2["default"].detach()
    w2a, w2b = layer.lokr_w2_a["default"].detach(), layer.lokr_w2_b["default"].detach()
    w2 = torch.einsum("ijuv,ip,jq->pquv", t2, w2a, w2b)  # (4, 4, 3, 3)
    delta = torch.zeros(16, 8, 3, 3, dtype=torch.float64)
    for i, j, k, q in itertools.product(range(4), range(2), range(4), range(4)):
        delta[i * 4 + k, j * 4 + q] = 2.0 * w1[i, j] * w2[k, q]
    expected = F.conv2d(x, conv.weight.double() + delta, conv.bias.double(), padding=1)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-10)
