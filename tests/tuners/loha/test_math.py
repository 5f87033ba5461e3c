"""LoHa's update in float64 against closed forms written out element by element (FedPara eq. 2, Prop. 3)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from peft import LoHaConfig, get_peft_model
from peft.tuners.loha.math import hadamard_delta, hadamard_delta_cp, loha_shapes
from peft.tuners.lycoris_common.math import cp_rebuild

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def test_hadamard_delta_elementwise():
    m, n, r, s = 5, 4, 3, 0.7
    w1a, w1b, w2a, w2b = rand(m, r), rand(r, n), rand(m, r), rand(r, n)
    got = hadamard_delta(w1a, w1b, w2a, w2b, s)
    for i, j in itertools.product(range(m), range(n)):
        left = sum(w1a[i, k] * w1b[k, j] for k in range(r))
        right = sum(w2a[i, k] * w2b[k, j] for k in range(r))
        assert abs(got[i, j] - s * left * right) < 1e-12


def test_hadamard_delta_gradient_matches_autograd():
    factors = [rand(5, 3).requires_grad_(), rand(3, 4).requires_grad_(), rand(5, 3).requires_grad_(),
               rand(3, 4).requires_grad_()]
    assert torch.autograd.gradcheck(lambda *f: hadamard_delta(*f, 0.7), factors)
    weights = rand(5, 4)
    (hadamard_delta(*factors, 0.7) * weights).sum().backward()
    ours = [f.grad.clone() for f in factors]
    for f in factors:
        f.grad = None
    ((factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 0.7 * weights).sum().backward()
    assert all(torch.allclose(a, f.grad, atol=1e-12) for a, f in zip(ours, factors))


def test_hadamard_product_reaches_rank_r_squared():
    r = 2
    delta = hadamard_delta(rand(8, r), rand(r, 8), rand(8, r), rand(r, 8), 1.0)
    assert torch.linalg.matrix_rank(delta).item() == r * r  # > r: the point of the Hadamard form


def test_cp_rebuild_elementwise():
    r, out, inp, k1, k2 = 2, 3, 4, 2, 3
    core, a, b = rand(r, r, k1, k2), rand(r, out), rand(r, inp)
    got = cp_rebuild(core, a, b)
    assert got.shape == (out, inp, k1, k2)
    for p, q, u, v in itertools.product(range(out), range(inp), range(k1), range(k2)):
        want = sum(core[i, j, u, v] * a[i, p] * b[j, q] for i in range(r) for j in range(r))
        assert abs(got[p, q, u, v] - want) < 1e-12
    t2, a2, b2 = rand(r, r, k1, k2), rand(r, out), rand(r, inp)
    both = hadamard_delta_cp(core, a, b, t2, a2, b2, 1.5)
    assert torch.allclose(both, 1.5 * got * cp_rebuild(t2, a2, b2), atol=1e-12)


def test_shapes_and_parameter_count():
    m, n, r = 24, 40, 4
    shapes = loha_shapes(m, n, (), r, effective_conv=False)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 2 * r * (m + n)
    flat = loha_shapes(16, 8, (3, 3), r, effective_conv=False)
    assert flat["hada_w1_b"] == (r, 8 * 9) and "hada_t1" not in flat
    eff = loha_shapes(16, 8, (3, 3), r, effective_conv=True)
    assert eff["hada_t1"] == (r, r, 3, 3) and eff["hada_w1_a"] == (r, 16) and eff["hada_w1_b"] == (r, 8)
    assert "hada_t1" not in loha_shapes(16, 8, (1, 1), r, effective_conv=True)  # 1x1: flattened form
    assert loha_shapes(16, 8, (3,), r, effective_conv=True)["hada_t2"] == (r, r, 3, 1)  # Conv1d


def _only_layer(model):
    return next(m for m in model.modules() if hasattr(m, "hada_w1_a"))


def test_linear_forward_closed_form():
    base = torch.nn.Sequential(torch.nn.Linear(6, 5)).double()
    model = get_peft_model(base, LoHaConfig(r=2, alpha=3, init_weights=False, target_modules=["0"]))
    layer, x = _only_layer(model), rand(7, 6)
    f = {k: getattr(layer, k)["default"].detach() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    delta = torch.zeros(5, 6, dtype=torch.float64)
    for i, j in itertools.product(range(5), range(6)):
        delta[i, j] = 1.5 * (f["hada_w1_a"][i] @ f["hada_w1_b"][:, j]) * (f["hada_w2_a"][i] @ f["hada_w2_b"][:, j])
    base_layer = layer.get_base_layer()
    expected = x @ (base_layer.weight + delta).T + base_layer.bias
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-12)
        assert torch.allclose(layer.get_delta_weight("default"), delta, atol=1e-12)


def test_conv_forward_closed_form_both_forms():
    for effective in (False, True):
        conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        model = get_peft_model(torch.nn.Sequential(conv).double(), LoHaConfig(
            r=2, alpha=4, init_weights=False, use_effective_conv2d=effective, target_modules=["0"]))
        layer, x = _only_layer(model), rand(2, 4, 7, 7)
        f = {k: c["default"].detach() for k, c in
             ((k, getattr(layer, k)) for k in layer.adapter_layer_names) if "default" in c}
        if effective:
            k1 = torch.einsum("ijuv,ip,jq->pquv", f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            k2 = torch.einsum("ijuv,ip,jq->pquv", f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
            delta = 2.0 * k1 * k2
        else:
            delta = (2.0 * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).view(6, 2, 3, 3)
        w = conv.weight.double()
        expected = F.conv2d(x, w + delta, conv.bias.double(), stride=2, padding=1, groups=2)
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-10)
