"""Quantized bases (bitsandbytes 4-bit / 8-bit) for the LoRA-GA offset: read W as a float matrix and write back
`W - s B A` requantized with the layer's *own* settings (quant type, block size, double quantization, storage
dtype, int8 threshold), never with bitsandbytes' constructor defaults (which would turn nf4 into fp4).

The dequantize / requantize round trip itself lives in `peft.utils.quantization` (shared with the bitsandbytes
LoRA layers' merge); this module is the LoRA-GA hook around it.
"""

from __future__ import annotations

import torch
from torch import nn

from ...utils.quantization import (
    add_to_bnb_weight,
    dequantize_bnb_layer,
    is_bnb_4bit_layer,
    is_bnb_8bit_layer,
    is_bnb_quantized_param,
)


def is_quantized(base: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit / Linear8bitLt whose weight is quantized."""
    return (is_bnb_4bit_layer(base) or is_bnb_8bit_layer(base)) and is_bnb_quantized_param(base.weight)


def dequantize(base: nn.Module) -> torch.Tensor:
    """The float (out, in) weight a quantized layer computes with, in fp32 (the layer is not changed)."""
    return dequantize_bnb_layer(base)


def requantize_residual(base: nn.Module, delta: torch.Tensor) -> None:
    """`W <- quant(dequant(W) - delta)` for a bitsandbytes base layer, in fp32, rounded once, with the layer's own
    quantization settings. `delta` is `s B A` (out, in)."""
    add_to_bnb_weight(base, delta.float(), sign=-1)
