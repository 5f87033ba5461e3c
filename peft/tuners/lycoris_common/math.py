"""Small tensor helpers shared by the LyCORIS-family layers (pure functions, no module state)."""

from __future__ import annotations

from typing import Optional

import torch


def cp_rebuild(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """Tucker/CP-style kernel from a core: `K[p, q, u, v] = sum_ij core[i, j, u, v] out_factor[i, p] in_factor[j, q]`.

    Shapes: core (r, r, k1, k2), out_factor (r, out), in_factor (r, in) -> (out, in, k1, k2). This is FedPara's
    Proposition 3 (the "effective conv2d" factorisation)."""
    return torch.einsum("ijuv,ip,jq->pquv", core, out_factor, in_factor)


def row_dropout_mask(rows: int, p: float, rescale: bool, like: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (rows, 1, ...) mask that zeroes each output row of a delta weight with probability `p`, broadcastable
    against `like`; with `rescale`, the kept rows are divided by the kept fraction (the mask's mean is 1). An
    all-dropped mask stays all zero."""
    keep = (torch.rand(rows, generator=generator) > p).to(device=like.device, dtype=like.dtype)
    if rescale and bool(keep.any()):
        keep = keep / keep.mean()
    return keep.view(rows, *([1] * (like.dim() - 1)))


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def adapter_dtype(weight: Optional[torch.Tensor]) -> torch.dtype:
    """Factors are kept in fp32 for half-precision or quantized bases and in the base dtype for fp32 / fp64 ones."""
    if weight is not None and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32
