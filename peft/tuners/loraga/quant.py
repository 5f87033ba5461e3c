"""Quantized bases (bitsandbytes 4-bit / 8-bit): read W as a float matrix and write back `W - s B A` requantized
with the layer's *own* settings (quant type, block size, double quantization, storage dtype, int8 threshold), never
with bitsandbytes' constructor defaults (which would turn nf4 into fp4)."""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(base: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit / Linear8bitLt whose weight is already quantized."""
    weight = getattr(base, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return bool(getattr(weight, "bnb_quantized", False))
    return kind == "Int8Params" and weight.dtype == torch.int8


def dequantize(base: nn.Module) -> torch.Tensor:
    """The float (out, in) weight a quantized layer computes with, in fp32."""
    import bitsandbytes.functional as bnbf

    weight = base.weight
    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return bnbf.int8_vectorwise_dequant(weight.data, weight.SCB).float()


def requantize_residual(base: nn.Module, delta: torch.Tensor) -> None:
    """`W <- quant(dequant(W) - delta)` for a bitsandbytes base layer, with the layer's own quantization settings.

    `delta` is `s B A` (out, in) in fp32. The new parameter replaces `base.weight` (same requires_grad=False)."""
    import bitsandbytes as bnb

    weight = base.weight
    device = weight.device
    residual = dequantize(base) - delta.to(device=device, dtype=torch.float32)  # (out, in)
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        new = bnb.nn.Params4bit(
            residual.to(state.dtype).cpu(), requires_grad=False, quant_type=weight.quant_type,
            blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
            quant_storage=weight.quant_storage, module=base,
        )
    else:
        new = bnb.nn.Int8Params(residual.to(torch.float16).cpu(), requires_grad=False,
                                has_fp16_weights=getattr(weight, "has_fp16_weights", False))
    base.weight = new.to(device)  # moving to a device quantizes
    if hasattr(base, "state") and hasattr(base.state, "reset_grads"):
        base.state.CB, base.state.SCB = None, None  # drop int8 caches of the old weight (threshold is kept)
