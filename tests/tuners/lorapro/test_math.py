"""LoRA-Pro math in float64 on tiny random shapes, against brute-force solves (`torch.linalg.lstsq` on the
vectorised systems) and closed forms built with explicit (test-only) m x m projectors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from peft.tuners.lorapro import math as lp

F64 = torch.float64


def _problem(m=5, n=4, r=2, s=2.0, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=gen, dtype=F64)
    B = torch.randn(m, r, generator=gen, dtype=F64)
    g = torch.randn(m, n, generator=gen, dtype=F64)
    gA, gB = lp.lora_gradients(A, B, g, s)
    return tuple(t.to(dtype) for t in (A, B, g, gA, gB))


def _projectors(A, B):
    """Test-only dense projectors: P_B (m, m) onto col(B), P_A (n, n) onto row(A)."""
    return B @ torch.linalg.pinv(B), torch.linalg.pinv(A) @ A


def _lift_matrix(A, B, s):
    """M with M @ [vec(gA'); vec(gB')] = vec(s B gA' + s gB' A) (row-major vec), built column by column."""
    r, n = A.shape
    m = B.shape[0]
    cols = []
    for k in range(r * n + m * r):
        e = torch.zeros(r * n + m * r, dtype=F64)
        e[k] = 1.0
        ga, gb = e[: r * n].reshape(r, n), e[r * n:].reshape(m, r)
        cols.append(lp.equivalent_gradient(A, B, ga, gb, s).flatten())
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("x_mode", lp.X_MODES)
def test_adjusted_gradients_solve_least_squares(x_mode):
    A, B, g, gA, gB = _problem()
    s = 2.0
    new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, x_mode)
    M = _lift_matrix(A, B, s)
    sol = torch.linalg.lstsq(M, g.flatten().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    best = M @ sol
    ours = lp.equivalent_gradient(A, B, new_gA, new_gB, s).flatten()
    torch.testing.assert_close(ours, best, atol=1e-10, rtol=1e-10)


def test_sylvester_x_is_the_closest_least_squares_solution():
    """Among all least-squares solutions (sol0 + null space of M), ours is nearest to the plain (gA, gB)."""
    s = 1.5
    A, B, g, gA, gB = _problem(m=6, n=5, r=2, s=s, seed=1)
    M = _lift_matrix(A, B, s)
    sol0 = torch.linalg.lstsq(M, g.flatten().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    U, S, Vh = torch.linalg.svd(M)
    null = Vh[(S > 1e-10).sum():].T  # (rn + mr, k)
    plain = torch.cat([gA.flatten(), gB.flatten()])
    z = torch.linalg.lstsq(null, (plain - sol0).unsqueeze(1)).solution.squeeze(1)
    closest = sol0 + null @ z
    new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, "sylvester")
    torch.testing.assert_close(torch.cat([new_gA.flatten(), new_gB.flatten()]), closest, atol=1e-9, rtol=1e-9)
    # and the other modes are strictly farther (for random data)
    dist = (torch.cat([new_gA.flatten(), new_gB.flatten()]) - plain).norm()
    for mode in ("zero", "symmetric"):
        other = torch.cat([t.flatten() for t in lp.adjusted_gradients(A, B, gA, gB, s, mode)])
        assert (other - plain).norm() > dist


def test_sylvester_residual_and_kron_solve():
    A, B, _, gA, _ = _problem(m=6, n=5, r=3, seed=2)
    s, damping = 2.0, 0.0
    gr = lp.grams(A, B, damping)
    C = torch.randn(3, 3, dtype=F64)
    X = lp.solve_sylvester(gr, C)
    BtB, AAt = B.T @ B, A @ A.T
    torch.testing.assert_close(BtB @ X + X @ AAt, C, atol=1e-10, rtol=1e-10)
    eye = torch.eye(3, dtype=F64)
    K = torch.kron(BtB, eye) + torch.kron(eye, AAt.T.contiguous())  # row-major vec: vec(PX) = (P kron I) vec(X)
    x_ref = torch.linalg.solve(K, C.flatten()).reshape(3, 3)
    torch.testing.assert_close(X, x_ref, atol=1e-10, rtol=1e-10)
    # the X used by "sylvester" mode solves eq. 10
    X10 = lp.choose_x(A, gA, s, gr, "sylvester")
    rhs = -(1 / s**2) * torch.linalg.inv(BtB) @ gA @ A.T
    torch.testing.assert_close(BtB @ X10 + X10 @ AAt, rhs, atol=1e-10, rtol=1e-10)


def test_equivalent_gradient_is_the_tangent_projection_and_independent_of_x():
    s = 0.7
    A, B, g, gA, gB = _problem(m=7, n=6, r=2, s=s, seed=3)
    PB, PA = _projectors(A, B)
    expected = PB @ g + (torch.eye(7, dtype=F64) - PB) @ g @ PA
    for mode in lp.X_MODES:
        new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, mode)
        torch.testing.assert_close(lp.equivalent_gradient(A, B, new_gA, new_gB, s), expected, atol=1e-10, rtol=0)
    # any X: (gA' + XA, gB' - BX) has the same equivalent gradient
    X = torch.randn(2, 2, dtype=F64)
    new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, "zero")
    torch.testing.assert_close(lp.equivalent_gradient(A, B, new_gA + X @ A, new_gB - B @ X, s), expected)
    torch.testing.assert_close(lp.projected_gradient(A, B, gA, gB, s), expected, atol=1e-10, rtol=0)
    # a projection: projecting g~ again changes nothing
    pA, pB = lp.lora_gradients(A, B, expected, s)
    torch.testing.assert_close(lp.projected_gradient(A, B, pA, pB, s), expected, atol=1e-10, rtol=0)


def test_symmetric_x_splits_the_shared_part_equally():
    A, B, g, gA, gB = _problem(seed=4)
    s = 2.0
    PB, PA = _projectors(A, B)
    new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, "symmetric")
    shared = PB @ g @ PA
    torch.testing.assert_close(s * B @ new_gA, PB @ g - 0.5 * shared, atol=1e-10, rtol=0)
    torch.testing.assert_close(s * new_gB @ A, g @ PA - PB @ g @ PA - 0.5 * shared + shared, atol=1e-10, rtol=0)


def test_w_update_does_not_depend_on_s():
    A, B, g, _, _ = _problem(seed=5)
    updates = []
    for s in (0.25, 2.0, 16.0):
        gA, gB = lp.lora_gradients(A, B, g, s)
        new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s)
        updates.append(lp.equivalent_gradient(A, B, new_gA, new_gB, s))
        # a real (small) step: W changes by -lr g~ + O(lr^2), whatever s is
        lr = 1e-7
        dW = s * ((B - lr * new_gB) @ (A - lr * new_gA) - B @ A) / -lr
        torch.testing.assert_close(dW, updates[0], atol=1e-5, rtol=0)
    for u in updates[1:]:
        torch.testing.assert_close(u, updates[0], atol=1e-10, rtol=0)


def test_full_rank_a_gives_the_full_gradient():
    A, B, g, gA, gB = _problem(m=6, n=3, r=3, seed=6)  # A square, invertible
    for mode in lp.X_MODES:
        new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, 2.0, mode)
        torch.testing.assert_close(lp.equivalent_gradient(A, B, new_gA, new_gB, 2.0), g, atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_equivalent_gradient_is_a_descent_direction(seed):
    A, B, g, gA, gB = _problem(m=6, n=5, r=2, s=3.0, seed=seed)
    new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, 3.0)
    g_tilde = lp.equivalent_gradient(A, B, new_gA, new_gB, 3.0)
    assert (g * g_tilde).sum() >= 0
    torch.testing.assert_close((g * g_tilde).sum(), (g_tilde * g_tilde).sum())  # <g, Pg> = |Pg|^2


def test_zero_b_guard():
    A, _, g, _, _ = _problem(seed=7)
    B = torch.zeros(5, 2, dtype=F64)
    s = 2.0
    gA, gB = lp.lora_gradients(A, B, g, s)
    for mode in lp.X_MODES:
        for damping in (0.0, 1e-8):
            new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, mode, damping)
            assert torch.equal(new_gA, torch.zeros_like(new_gA))
            expected = gB @ torch.linalg.inv(A @ A.T + damping * torch.eye(2, dtype=F64)) / s**2
            torch.testing.assert_close(new_gB, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("case", ["tiny_b", "rank_deficient_a", "zero_grads", "zero_a_and_b"])
def test_no_nan_or_inf(dtype, case):
    A, B, g, _, _ = _problem(m=6, n=5, r=3, seed=8)
    if case == "tiny_b":
        B = B * 1e-20
    elif case == "rank_deficient_a":
        A = torch.cat([A[:2], A[:1] * 2.0])
    elif case == "zero_a_and_b":
        A, B = torch.zeros_like(A), torch.zeros_like(B)
    if case == "zero_grads":
        g = torch.zeros_like(g)
    A, B, g = A.to(dtype), B.to(dtype), g.to(dtype)
    gA, gB = lp.lora_gradients(A.float(), B.float(), g.float(), 2.0)
    gA, gB = gA.to(dtype), gB.to(dtype)
    for mode in lp.X_MODES:
        for damping in (0.0, 1e-8):
            outs = lp.adjusted_gradients(A, B, gA, gB, 2.0, mode, damping)
            assert all(torch.isfinite(o).all() for o in outs), (mode, damping)
            assert outs[0].dtype == lp.compute_dtype(A)
            if case == "zero_grads":
                assert all(not o.any() for o in outs)


def test_bf16_inputs_match_fp64_reference():
    A, B, g, gA, gB = _problem(seed=9)
    ref = lp.adjusted_gradients(A, B, gA, gB, 2.0)
    low = [t.to(torch.bfloat16) for t in (A, B, gA, gB)]
    ours = lp.adjusted_gradients(*low, 2.0)
    exact_on_rounded = lp.adjusted_gradients(*[t.double() for t in low], 2.0)
    for o, e in zip(ours, exact_on_rounded):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), e, atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(o).all() for o in ours) and len(ref) == 2


def test_adam_direction_bias_correction_from_step_one():
    g = torch.tensor([[2.0, -3.0], [0.5, 0.0]], dtype=F64)
    hp = lp.AdamHyper(lr=0.1, eps=1e-8)
    m, v = torch.zeros_like(g), torch.zeros_like(g)
    U = lp.adam_direction(m, v, g, 1, hp)
    torch.testing.assert_close(U, g / (g.abs() + 1e-8))
    g2 = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    U2 = lp.adam_direction(m, v, g2, 2, hp)
    m_ref = (0.9 * 0.1 * g + 0.1 * g2) / (1 - 0.9**2)
    v_ref = (0.999 * 0.001 * g**2 + 0.001 * g2**2) / (1 - 0.999**2)
    torch.testing.assert_close(U2, m_ref / (v_ref.sqrt() + 1e-8))
    with pytest.raises(ValueError, match="step=0"):
        lp.adam_direction(m, v, g, 0, hp)


def test_full_mode_step_first_step_from_zero_b():
    """Step 1 after LoRA's init (B = 0): W moves by -lr U P_A, U = sign(g P_A) (Adam's first step)."""
    A, _, g, _, _ = _problem(seed=10)
    B = torch.zeros(5, 2, dtype=F64)
    s, hp = 2.0, lp.AdamHyper(lr=1e-3, eps=0.0)
    gA, gB = lp.lora_gradients(A, B, g, s)
    m, v = torch.zeros(5, 4, dtype=F64), torch.zeros(5, 4, dtype=F64)
    new_A, new_B = lp.full_mode_step(A, B, gA, gB, s, m, v, 1, hp)
    _, PA = _projectors(A, B)
    U = torch.sign(g @ PA)
    torch.testing.assert_close(new_A, A)
    torch.testing.assert_close(s * (new_B @ new_A - B @ A), -hp.lr * U @ PA, atol=1e-12, rtol=0)


def test_invalid_x_mode():
    A, B, _, gA, gB = _problem()
    with pytest.raises(ValueError, match="x_mode='nope'"):
        lp.adjusted_gradients(A, B, gA, gB, 2.0, "nope")


def test_zero_x_gives_the_closed_forms():
    """X = 0: A takes `P_B g`, B the rest `(I - P_B) g P_A`; `gA' = (1/s^2) (B^T B)^-1 gA`."""
    s = 1.3
    A, B, g, gA, gB = _problem(m=6, n=5, r=2, s=s, seed=11)
    PB, PA = _projectors(A, B)
    new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, "zero")
    torch.testing.assert_close(new_gA, torch.linalg.inv(B.T @ B) @ gA / s**2, atol=1e-10, rtol=0)
    torch.testing.assert_close(s * B @ new_gA, PB @ g, atol=1e-10, rtol=0)
    torch.testing.assert_close(s * new_gB @ A, (torch.eye(6, dtype=F64) - PB) @ g @ PA, atol=1e-10, rtol=0)


@pytest.mark.parametrize("x_mode", lp.X_MODES)
def test_damping_is_added_to_both_grams(x_mode):
    """With damping d every inverse is `(B^T B + dI)^-1` / `(A A^T + dI)^-1`, in the projector and in eq. 10 too."""
    s, d, r = 2.0, 0.3, 2
    A, B, g, gA, gB = _problem(seed=12)
    eye = torch.eye(r, dtype=F64)
    BtB, AAt = B.T @ B + d * eye, A @ A.T + d * eye
    Bi, Ai = torch.linalg.inv(BtB), torch.linalg.inv(AAt)
    C = -(1 / s**2) * Bi @ gA @ A.T
    if x_mode == "zero":
        X = torch.zeros(r, r, dtype=F64)
    elif x_mode == "sylvester":
        K = torch.kron(BtB, eye) + torch.kron(eye, AAt.T.contiguous())
        X = torch.linalg.solve(K, C.flatten()).reshape(r, r)
    else:
        X = 0.5 * C @ Ai
    expected_gA = Bi @ gA / s**2 + X @ A
    expected_gB = (gB - B @ Bi @ B.T @ gB) @ Ai / s**2 - B @ X
    new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, s, x_mode, d)
    torch.testing.assert_close(new_gA, expected_gA, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(new_gB, expected_gB, atol=1e-10, rtol=1e-10)
    undamped = lp.adjusted_gradients(A, B, gA, gB, s, x_mode, 0.0)
    assert (undamped[1] - new_gB).abs().max() > 1e-3  # damping has an effect


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("m, n", [(300, 6), (6, 300)])
def test_no_m_by_m_or_n_by_n_matrix_is_formed(m, n):
    """Adjusting never makes a tensor bigger than (max(m, n), r); full mode's step none bigger than (m, n)."""
    r, s = 3, 2.0
    A, B, g, gA, gB = _problem(m=m, n=n, r=r, seed=13)
    with _ShapeLog() as dense:
        _projectors(A, B)
    assert max(dense.numels) >= max(m, n) ** 2  # the guard sees a dense projector
    for x_mode in lp.X_MODES:
        with _ShapeLog() as log:
            lp.adjusted_gradients(A, B, gA, gB, s, x_mode, 1e-8)
        assert log.numels and max(log.numels) <= max(m, n) * r, x_mode
    moments = torch.zeros(m, n, dtype=F64), torch.zeros(m, n, dtype=F64)
    with _ShapeLog() as log:
        lp.full_mode_step(A, B, gA, gB, s, *moments, 1, lp.AdamHyper(lr=1e-3))
    assert max(log.numels) <= m * n


def test_full_mode_w_step_does_not_depend_on_s_efficient_scales_with_it():
    """Full mode moves W by `-lr P(U)` (U: Adam direction of g~, independent of s): full fine-tuning's learning rate.
    Efficient mode's first step is `-lr s (B sign(gA') + sign(gB') A)`: proportional to s, like LoRA's."""
    A, B, g, _, _ = _problem(m=6, n=5, r=2, seed=14)
    hp = lp.AdamHyper(lr=1e-7, eps=0.0)
    full, efficient = [], []
    for s in (0.5, 4.0):
        gA, gB = lp.lora_gradients(A, B, g, s)
        new_A, new_B = lp.full_mode_step(A, B, gA, gB, s, torch.zeros_like(g), torch.zeros_like(g), 1, hp)
        full.append(s * (new_B @ new_A - B @ A) / hp.lr)
        moments = tuple(torch.zeros_like(t) for t in (A, A, B, B))
        new_A, new_B = lp.efficient_mode_step(A, B, gA, gB, s, moments, 1, hp)
        efficient.append(s * (new_B @ new_A - B @ A) / hp.lr)
    torch.testing.assert_close(full[1], full[0], atol=1e-5, rtol=0)
    assert full[0].abs().max() > 0.1
    torch.testing.assert_close(efficient[1], 8.0 * efficient[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["zero_b", "tiny_b", "rank_deficient_a", "zero_grads"])
def test_mode_steps_stay_finite(dtype, case):
    A, B, g, _, _ = _problem(m=6, n=5, r=3, seed=15)
    B = {"zero_b": B * 0, "tiny_b": B * 1e-20}.get(case, B)
    A = torch.cat([A[:2], A[:1] * 2.0]) if case == "rank_deficient_a" else A
    g = g * 0 if case == "zero_grads" else g
    A, B = A.to(dtype), B.to(dtype)
    gA, gB = (t.to(dtype) for t in lp.lora_gradients(A.double(), B.double(), g, 2.0))
    hp = lp.AdamHyper(lr=1e-3, weight_decay=0.01)
    for x_mode in lp.X_MODES:
        full = lp.full_mode_step(A, B, gA, gB, 2.0, torch.zeros(6, 5), torch.zeros(6, 5), 1, hp, x_mode, 1e-8)
        moments = (torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(6, 3), torch.zeros(6, 3))
        efficient = lp.efficient_mode_step(A, B, gA, gB, 2.0, moments, 1, hp, x_mode, 1e-8)
        assert all(torch.isfinite(t).all() for t in (*full, *efficient, *moments)), x_mode


def test_grams_batched_equals_one_pair_at_a_time():
    """Pairs of mixed rank and dtype, with their own dampings (one pair rank-deficient, one with B = 0), decomposed
    together give the same pseudo-inverses and eigenvalues as one pair at a time."""
    cases = [_problem(5, 4, 2, seed=1), _problem(6, 7, 3, seed=2), _problem(5, 4, 2, seed=3, dtype=torch.float32),
             _problem(4, 6, 2, seed=4)]
    cases[1] = (cases[1][0], torch.zeros_like(cases[1][1]), *cases[1][2:])  # B = 0
    cases[3] = (torch.cat([cases[3][0][:1], cases[3][0][:1]]), *cases[3][1:])  # rank-deficient A
    factors = [(A, B) for A, B, *_ in cases]
    dampings = [0.0, 1e-3, 0.0, 1e-6]
    batched = lp.grams_batched(factors, dampings)
    for (A, B), d, g in zip(factors, dampings, batched):
        one = lp.grams(A, B, d)
        tol = 1e-12 if A.dtype == F64 else 1e-5
        for name in ("lb", "la", "binv", "ainv"):
            torch.testing.assert_close(getattr(g, name), getattr(one, name), rtol=tol, atol=tol)
        if d > 0:  # damped: an ordinary inverse
            expected = torch.linalg.inv(B.T @ B + d * torch.eye(B.shape[1], dtype=B.dtype))
            torch.testing.assert_close(g.binv, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one per pair"):
        lp.grams_batched(factors, dampings[:2])


class _EighCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += "eigh" in str(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_optimizer_step_decomposes_all_layers_in_one_eigh_per_rank(mode):
    """A LoraProAdamW step on 3 adapted layers with 2 distinct ranks makes 2 eigh calls (not 2 per layer): on a GPU
    each call is a solver launch and a synchronisation."""
    from torch import nn

    from peft import LoraProConfig, get_peft_model
    from peft.optimizers import LoraProAdamW

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    model = get_peft_model(base, LoraProConfig(r=2, lora_alpha=4, target_modules=["0", "2", "4"], mode=mode,
                                               rank_pattern={"4": 3}))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    model(torch.randn(5, 8)).square().mean().backward()
    optimizer = LoraProAdamW(model, lr=1e-2)
    with _EighCount() as count:
        optimizer.step()
    assert count.calls == 2


def _stack_problem(k=4, m=6, n=5, r=3):
    """k pairs of one shape, float64: one with B = 0, one rank-deficient A (a zero row), one with tiny A and B next
    to one with a large B (a floor shared by the stack instead of one per matrix would zero the tiny one's Gram
    inverse and its Sylvester denominators)."""
    A, B, gA, gB = (torch.stack(ts) for ts in zip(*(_problem(m, n, r, seed=20 + i)[:2] + _problem(
        m, n, r, seed=20 + i)[3:] for i in range(k))))
    B[0] = 0.0
    A[1, -1] = 0.0
    A[2], B[2] = A[2] * 1e-6, B[2] * 1e-6
    B[3] *= 1e4
    gA, gB = lp.lora_gradients(A, B, torch.randn(k, m, n, generator=torch.Generator().manual_seed(7), dtype=F64), 2.0)
    return A, B, gA, gB


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("x_mode", lp.X_MODES)
def test_batched_adjustment_equals_a_loop_of_single_pairs(x_mode, damping):
    A, B, gA, gB = _stack_problem()
    s = 2.0
    batched = lp.adjusted_gradients(A, B, gA, gB, s, x_mode, damping)
    g = lp.grams(A, B, damping)
    C = torch.randn(4, 3, 3, dtype=F64)
    X = lp.solve_sylvester(g, C)
    for j in range(4):
        one = lp.adjusted_gradients(A[j], B[j], gA[j], gB[j], s, x_mode, damping)
        for ours, ref in zip(batched, one):
            torch.testing.assert_close(ours[j], ref, atol=1e-12, rtol=1e-10, msg=f"pair {j}")
        torch.testing.assert_close(X[j], lp.solve_sylvester(lp.grams(A[j], B[j], damping), C[j]), atol=1e-12,
                                   rtol=1e-10)
    assert not batched[0][0].any()  # B = 0: gA' = 0
    if damping == 0:  # the tiny B kept its own (large) inverse: its floor is its own, not the large B's
        assert batched[0][2].abs().max() > 1.0


@pytest.mark.parametrize("x_mode", lp.X_MODES)
def test_batched_mode_steps_equal_a_loop_of_single_pairs(x_mode):
    A, B, gA, gB = _stack_problem()
    s, hp, k = 2.0, lp.AdamHyper(lr=1e-2, weight_decay=0.1), 4
    for step in (1, 2):  # moments carried from step 1 into step 2
        if step == 1:
            eff = [torch.rand(k, *t.shape[1:], dtype=F64) for t in (A, A, B, B)]
            full = [torch.rand(k, 6, 5, dtype=F64) for _ in range(2)]
            eff_ref, full_ref = [t.clone() for t in eff], [t.clone() for t in full]
        new_eff = lp.efficient_mode_step(A, B, gA, gB, s, tuple(eff), step, hp, x_mode, 1e-8)
        new_full = lp.full_mode_step(A, B, gA, gB, s, list(full[0]), list(full[1]), step, hp, x_mode, 1e-8)
        for j in range(k):
            ref_eff = lp.efficient_mode_step(A[j], B[j], gA[j], gB[j], s, tuple(t[j] for t in eff_ref), step, hp,
                                             x_mode, 1e-8)
            ref_full = lp.full_mode_step(A[j], B[j], gA[j], gB[j], s, full_ref[0][j], full_ref[1][j], step, hp,
                                         x_mode, 1e-8)
            for ours, ref in zip((*new_eff, *new_full), (*ref_eff, *ref_full)):
                torch.testing.assert_close(ours[j], ref, atol=1e-12, rtol=1e-10, msg=f"pair {j}, step {step}")
        for ours, ref in zip(eff + full, eff_ref + full_ref):
            torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)  # moments updated alike
    # full mode with stacked (k, m, n) moment tensors: the same step
    moments = [t.clone() for t in full]
    stacked = lp.full_mode_step(A, B, gA, gB, s, *moments, 3, hp, x_mode, 1e-8)
    listed = lp.full_mode_step(A, B, gA, gB, s, list(full[0]), list(full[1]), 3, hp, x_mode, 1e-8)
    for ours, ref in zip(stacked, listed):
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)


def test_grams_batched_takes_stacks():
    """Stacks and single pairs of one rank in one call: each member as if decomposed alone, one eigh call."""
    A, B, _, _ = _stack_problem()
    single = _problem(7, 4, 3, seed=30)
    with _EighCount() as count:
        stack_g, single_g = lp.grams_batched([(A, B), single[:2]], [1e-3, 0.0])
    assert count.calls == 1 and stack_g.binv.shape == (4, 3, 3) and single_g.binv.shape == (3, 3)
    for j in range(4):
        one = lp.grams(A[j], B[j], 1e-3)
        for name in ("lb", "la", "binv", "ainv"):
            torch.testing.assert_close(getattr(stack_g, name)[j], getattr(one, name), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single_g.binv, lp.grams(*single[:2]).binv, rtol=1e-12, atol=1e-12)
