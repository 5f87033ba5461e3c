"""LoHa's update as pure functions (FedPara, Hyeon-Woo et al. 2022, eq. 2 and Proposition 3)."""

from __future__ import annotations

import torch

from ..lycoris_common.math import cp_rebuild


def hadamard_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """`scale * (w1a @ w1b) * (w2a @ w2b)`: w1a, w2a (m, r); w1b, w2b (r, n) -> (m, n).

    Under autograd only the four factors are kept for the backward pass (the two m x n products are recomputed
    there), not the products themselves: one m x n tensor less per adapted layer than plain autograd."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w1a, w1b, w2a, w2b)):
        return _HadamardDelta.apply(w1a, w1b, w2a, w2b, scale)
    return (w1a @ w1b) * (w2a @ w2b) * scale


class _HadamardDelta(torch.autograd.Function):
    """d/dW1 of `s W1 ⊙ W2` is `s G ⊙ W2` (G the output gradient), then the chain rule through W1 = w1a w1b."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # (m, n): gradient w.r.t. W1
        g2 = grad * (w1a @ w1b)  # (m, n): gradient w.r.t. W2
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


def hadamard_delta_cp(t1: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, t2: torch.Tensor,
                      w2a: torch.Tensor, w2b: torch.Tensor, scale: float) -> torch.Tensor:
    """The conv form: `scale * K1 * K2` with `K_i = cp_rebuild(t_i, w_ia, w_ib)`: t (r, r, k1, k2), w_ia (r, out),
    w_ib (r, in) -> (out, in, k1, k2)."""
    return cp_rebuild(t1, w1a, w1b) * cp_rebuild(t2, w2a, w2b) * scale


def loha_shapes(out_features: int, in_per_group: int, kernel: tuple[int, ...], r: int,
                effective_conv: bool) -> dict[str, tuple[int, ...]]:
    """Factor shapes for a base weight (out, in_per_group, *kernel). Linear: kernel (). A conv is flattened to
    (out, in_per_group * prod(kernel)) unless `effective_conv` and the kernel is not all ones; then each Hadamard
    factor is a core (r, r, k1, k2) with mode factors (r, out) and (r, in_per_group) (Conv1d: k2 = 1)."""
    if effective_conv and kernel and any(k != 1 for k in kernel):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        return {"hada_w1_a": (r, out_features), "hada_w1_b": (r, in_per_group), "hada_t1": core,
                "hada_w2_a": (r, out_features), "hada_w2_b": (r, in_per_group), "hada_t2": core}
    n = in_per_group
    for k in kernel:
        n *= k
    return {"hada_w1_a": (out_features, r), "hada_w1_b": (r, n), "hada_w2_a": (out_features, r), "hada_w2_b": (r, n)}
