"""LoRA-GA init math against an explicit float64 SVD (signs of singular vectors are free: align, then compare)."""

import math

import pytest
import torch

from peft.tuners.loraga import init_math as im

M, N, R = 12, 9, 3


def _grad(seed=0, m=M, n=N):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=gen, dtype=torch.float64)


def _align_rows(actual, expected):
    """Flip each row of `actual` to the sign of the matching row of `expected`."""
    signs = torch.sign((actual * expected).sum(dim=1, keepdim=True))
    return actual * signs


def _expected(G, W, r, scaling, direction, scale, gamma, idx):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    idx_A, idx_B = idx
    A, B = Vh[idx_A], U[:, idx_B]
    m = G.shape[0]
    factor = {
        "stable": m**0.25 / math.sqrt(gamma),
        "gd": 1 / scaling,
        "unit": 1.0,
        "weightS": torch.sqrt(torch.linalg.svdvals(W)[:r] / scaling).mean().item(),
    }[scale]
    return A * factor, B * factor


INDICES = {
    "ArB2r": (list(range(0, R)), list(range(R, 2 * R))),
    "A2rBr": (list(range(R, 2 * R)), list(range(0, R))),
    "ArBr": ([1, 3, 5], [0, 2, 4]),
}


@pytest.mark.parametrize("scale", im.SCALES)
@pytest.mark.parametrize("direction", im.DIRECTIONS)
def test_factors_match_explicit_svd(direction, scale):
    G, W, scaling, gamma = _grad(0), _grad(1), 2.0 / R, 4
    gen = torch.Generator().manual_seed(7)
    A, B = im.lora_ga_factors(G, R, scaling, direction, scale, gamma, weight=W, svd="exact", generator=gen,
                              compute_dtype=torch.float64)
    if direction == "random":
        idx = im.direction_indices(R, "random", torch.Generator().manual_seed(7))
        assert sorted(idx[0].tolist() + idx[1].tolist()) == list(range(2 * R))
    else:
        idx = INDICES[direction]
    exp_A, exp_B = _expected(G, W, R, scaling, direction, scale, gamma, idx)
    assert A.shape == (R, N) and B.shape == (M, R) and A.dtype == torch.float64
    torch.testing.assert_close(_align_rows(A, exp_A), exp_A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_align_rows(B.T, exp_B.T).T, exp_B, rtol=1e-10, atol=1e-10)


def test_randomized_svd_close_to_exact_on_low_rank_gradient():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(40, 2 * R, generator=gen) @ torch.diag(torch.tensor([9.0, 7, 5, 4, 3, 2])) @ torch.randn(
        2 * R, 30, generator=gen)
    A, B = im.lora_ga_factors(G, R, 1.0, scale="unit", svd="randomized")
    A_ex, B_ex = im.lora_ga_factors(G, R, 1.0, scale="unit", svd="exact")
    torch.testing.assert_close(_align_rows(A, A_ex), A_ex, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_align_rows(B.T, B_ex.T).T, B_ex, atol=1e-4, rtol=1e-4)


def test_first_step_is_best_rank_2r_approximation():
    """ArB2r / unit: `B B^T G + G A^T A` is exactly the rank-2r truncation of G (paper eq. 8)."""
    G = _grad(3)
    A, B = im.lora_ga_factors(G, R, 1.0, "ArB2r", "unit", compute_dtype=torch.float64)
    step = B @ B.T @ G + G @ A.T @ A
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    best = U[:, : 2 * R] @ torch.diag(S[: 2 * R]) @ Vh[: 2 * R]
    torch.testing.assert_close(step, best, rtol=1e-10, atol=1e-10)


def test_rank_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match=r"2\*r <= min\(out, in\).*r=5.*12 x 9"):
        im.lora_ga_factors(_grad(), 5, 1.0)


@pytest.mark.parametrize(("kwargs", "match"), [({"direction": "AB"}, "direction 'AB'"),
                                               ({"scale": "big"}, "scale 'big'"),
                                               ({"svd": "fast"}, "svd method 'fast'")])
def test_unknown_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        im.lora_ga_factors(_grad(), 2, 1.0, **kwargs)


def test_weight_scale_needs_weight():
    with pytest.raises(ValueError, match="weightS"):
        im.lora_ga_factors(_grad(), 2, 1.0, scale="weightS")


def test_offset_uses_factors_as_stored_and_rounds_once():
    W = _grad(4).to(torch.bfloat16)
    A, B = (t.to(torch.bfloat16) for t in im.lora_ga_factors(_grad(5).float(), R, 0.5))
    new = im.offset_weight(W, A, B, 0.5)
    expected = (W.float() - 0.5 * (B.float() @ A.float())).to(torch.bfloat16)
    assert new.dtype == torch.bfloat16 and torch.equal(new, expected)


def test_final_factors_reproduce_difference():
    A, B, A0, B0 = (_grad(i, *shape) for i, shape in enumerate([(R, N), (M, R), (R, N), (M, R)]))
    new_A, new_B = im.final_factors(A, B, A0, B0)
    assert new_A.shape == (2 * R, N) and new_B.shape == (M, 2 * R)
    torch.testing.assert_close(new_B @ new_A, B @ A - B0 @ A0)
    conv_A, conv_B = torch.randn(R, 2, 3, 3), torch.randn(4, R, 1, 1)
    ca, cb = im.final_factors(conv_A, conv_B, conv_A, conv_B)
    assert ca.shape == (2 * R, 2, 3, 3) and cb.shape == (4, 2 * R, 1, 1)
    with pytest.raises(ValueError, match="do not match"):
        im.final_factors(A, B, A0[:1], B0)


@pytest.mark.parametrize("rslora", [False, True])
def test_final_scale_is_unchanged(rslora):
    from peft.tuners.lora.functional import lora_scaling

    alpha = im.final_alpha(16, rslora)
    assert lora_scaling(alpha, 2 * R, rslora) == pytest.approx(lora_scaling(16, R, rslora))
    ranks, alphas = im.final_patterns({"q": 4}, {"k": 8}, rslora)
    assert ranks == {"q": 8}
    assert lora_scaling(alphas["k"], 2 * R, rslora) == pytest.approx(lora_scaling(8, R, rslora))


def test_svd_does_not_depend_on_the_callers_thread_count():
    """LAPACK's SVD differs in the last bits with the number of threads (here the singular vectors of a 1536 x 384
    float32 matrix, by ~3e-4 between 1 and 2 threads): LoRA-GA's runs on one, so an init repeats exactly."""
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(1536, 384, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(im.top_svd(matrix, 16, "exact"))
            assert torch.get_num_threads() == count  # restored after the SVD
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
