"""Pure tensor math of LoRA on N-d convolutions (N = 1, 2, 3), grouped or not.

The adapter of a conv with kernel `W` (c_out, c_in / g, *k) and `g` groups is the composition of
- A: a dense conv with the base's kernel size, stride, padding and dilation, c_in -> r, weight (r, c_in, *k);
- B: a pointwise (kernel 1) conv r -> c_out with the base's `g` groups, weight (c_out, r / g, *1).

Because B is pointwise, `B(A(x)) = conv(x, K)` with one kernel `K` (c_out, c_in, *k): output channel `o` lies in
group `j = o // (c_out / g)` and only sees A's channels `j * r/g ... (j + 1) * r/g - 1`:

    K[o] = sum_q B[o, q] * A[j * r/g + q]            (q < r / g)

With `g = 1` this is `K = B @ A` on the kernels flattened to matrices. `K` is dense over all `c_in` channels, so for
`g > 1` it has no place in the grouped base kernel (c_out, c_in / g, *k) unless it is block diagonal; merging such
an adapter is therefore refused (as upstream PEFT does).
"""

from __future__ import annotations

import torch


def check_rank_divides_groups(r: int, groups: int, where: str = "", kind: str = "conv layer") -> None:
    """B is a conv with the base's groups over r input channels: r must be a multiple of groups."""
    if r % groups != 0:
        raise ValueError(
            f"Targeting a {kind} with groups={groups} and rank {r}. Currently, support is limited to conv layers where "
            "the rank is divisible by groups. Either choose a different rank or do not target this specific layer. "
            f"Here r={r} is not divisible by groups={groups}{where}: the B conv shares the base conv's groups, "
            f"so r must be a multiple of groups (e.g. r={groups * max(1, r // groups)}), or do not target this layer."
        )


def conv_delta_kernel(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, groups: int = 1) -> torch.Tensor:
    """`s * K` in at least fp32: A (r, c_in, *k), B (c_out, r / g, *1) -> K (c_out, c_in, *k) (dense)."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    r, c_out = lora_A.shape[0], lora_B.shape[0]
    check_rank_divides_groups(r, groups)
    if lora_B.shape[1] * groups != r or c_out % groups != 0:
        raise ValueError(
            f"lora_B of shape {tuple(lora_B.shape)} does not fit lora_A {tuple(lora_A.shape)} with groups={groups}: "
            f"expected (c_out, r / groups, 1, ...) with c_out divisible by groups."
        )
    a = lora_A.to(dtype).reshape(groups, r // groups, -1)  # (g, r/g, c_in*prod(k))
    b = lora_B.to(dtype).reshape(groups, c_out // groups, r // groups)  # (g, c_out/g, r/g)
    kernel = torch.bmm(b, a)  # (g, c_out/g, c_in*prod(k))
    return (kernel * scaling).reshape(c_out, *lora_A.shape[1:])

