"""Pure LoRA math on tensors: the low-rank update and merging it into a weight."""

from __future__ import annotations

import math

import torch


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """`s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski 2023, eq. 1)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False):
    """`s * B @ A` in at least fp32: A (r, n), B (m, r) -> (m, n), or (n, m) when the base stores W transposed."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling  # (m, n)
    return delta.T if fan_in_fan_out else delta


def conv2d_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Update of a Conv2d kernel: A (r, c_in, kh, kw), B (c_out, r, 1, 1) -> (c_out, c_in, kh, kw)."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    flat = lora_B.to(dtype).flatten(1) @ lora_A.to(dtype).flatten(1)  # (c_out, c_in*kh*kw)
    return (flat * scaling).reshape(lora_B.shape[0], *lora_A.shape[1:])


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """`W + sign * delta` computed in at least fp32 and rounded once to W's dtype."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(dtype) + sign * delta.to(dtype)).to(weight.dtype)
