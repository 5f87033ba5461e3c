"""LoRA on bitsandbytes layers (QLoRA): `Linear4bit` (nf4 / fp4) and `Linear8bitLt` (LLM.int8).

Forward: `y = base(x) + s * B A dropout(x)`, the quantized base computing as bitsandbytes does and the LoRA branch
in the adapter's dtype (fp32), the sum cast back to the input dtype.

Merge: `W <- requant(dequant(W) + sum_i s_i B_i A_i)` in fp32 (DoRA: `m / ||W + s B A||_c * (W + s B A)`),
requantized with the layer's own settings (see `peft.utils.quantization`); unmerge inverts it the same way.
A 4-bit (or 8-bit) grid cannot hold `W + s B A`
exactly, so the merged layer only approximates the adapter model: a warning says so once per process.

CPU packing: on CPUs with AVX512-BF16 bitsandbytes repacks a `Linear4bit` weight in an eval forward without grad and
then multiplies with a kernel that has no backward. A forward that needs gradients (train mode, or an input that
requires grad) first restores the canonical layout, so training after an evaluation pass gets correct gradients.

This module never imports bitsandbytes: the dispatcher only recognises bitsandbytes layers once bitsandbytes has been
imported (a model cannot hold one before), so `import peft` stays free of it.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ...utils.quantization import (
    dequantize_bnb_layer,
    is_bnb_4bit_layer,
    is_bnb_8bit_layer,
    is_bnb_quantized_param,
    replace_bnb_weight,
    unpack_bnb_4bit_for_training,
)
from .dispatch import DISPATCHERS, UnsupportedTargetError
from .layer import LoraLayer

_ROUNDING_WARNED = False


def warn_quantized_merge_once() -> None:
    """Warn (once per process) that merging into a quantized base rounds `W + s B A` to the quantization grid."""
    global _ROUNDING_WARNED
    if _ROUNDING_WARNED:
        return
    _ROUNDING_WARNED = True
    warnings.warn(
        "Merging LoRA weights into a bitsandbytes-quantized layer: W + s*B@A is requantized (4-bit / int8), so the "
        "merged model only approximates the adapter model and unmerging does not restore W bit for bit.",
        UserWarning,
        stacklevel=3,
    )


class QuantizedLinear(nn.Module, LoraLayer):
    """LoRA around a bitsandbytes linear layer; the base weight is only read through dequantize / requantize."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
        fan_in_fan_out: bool = False, use_dora: bool = False, lora_bias: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        if fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True but the target is a {type(self.get_base_layer()).__name__} "
                          "(stored out x in); using False.")
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          use_dora=use_dora, lora_bias=lora_bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if torch.is_grad_enabled() and (base.training or x.requires_grad):
            unpack_bnb_4bit_for_training(base)  # CPU-packed after an eval pass: its kernel has no backward
        result = self._base_forward(x, *args, **kwargs)
        return self._add_lora_branches(x, result, x.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s * B @ A` (out, in) in fp32: a quantized weight has no float dtype to cast to."""
        return self._delta_fp32(adapter_name)

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as fp32 (out, in), including merged adapters; the base layer is not changed."""
        return dequantize_bnb_layer(self.get_base_layer())

    # `LoraLayer.merge` / `unmerge` (LoRA, DoRA, lora_bias) read and write the weight through these two.
    _merge_checks_finite = True  # `safe_merge` is implied: a non-finite result raises, the layer is unchanged

    def _base_weight_fp(self) -> torch.Tensor:
        return dequantize_bnb_layer(self.get_base_layer())

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        replace_bnb_weight(self.get_base_layer(), weight)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """`W <- requant(W')` with `W'` as `LoraLayer.merge` computes it in fp32 (LoRA: `dequant(W) + sum s B A`;
        DoRA: `m / ||.||_c * (W + s B A)`), rounding once. A non-finite result raises ValueError."""
        if self._adapters_to_merge(adapter_names):
            warn_quantized_merge_once()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Linear4bit(QuantizedLinear):
    """LoRA around `bitsandbytes.nn.Linear4bit` (QLoRA: nf4 / fp4, optional double quant)."""


class Linear8bitLt(QuantizedLinear):
    """LoRA around `bitsandbytes.nn.Linear8bitLt` (LLM.int8)."""


def dispatch_bnb(target: nn.Module, adapter_name: str, lora_config, **kwargs) -> Optional[nn.Module]:
    """`Linear8bitLt` -> `Linear8bitLt` LoRA, `Linear4bit` -> `Linear4bit` LoRA; None for anything else.

    Raises `UnsupportedTargetError` for a bitsandbytes layer with a quantized weight that has no LoRA layer here
    (e.g. `Embedding4bit`), which the plain dispatchers would otherwise wrap as if its weight were float.
    """
    if "bitsandbytes" not in sys.modules:
        return None
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if is_bnb_8bit_layer(base):
        lora_config.fan_in_fan_out = False
        return Linear8bitLt(target, adapter_name, **kwargs)
    if is_bnb_4bit_layer(base):
        lora_config.fan_in_fan_out = False
        return Linear4bit(target, adapter_name, **kwargs)
    if type(base).__module__.startswith("bitsandbytes") and is_bnb_quantized_param(getattr(base, "weight", None)):
        raise UnsupportedTargetError(
            f"this bitsandbytes layer has a quantized {type(base.weight).__name__} weight and no LoRA layer; "
            "supported bitsandbytes layers: Linear4bit, Linear8bitLt."
        )
    return None


if dispatch_bnb not in DISPATCHERS:
    DISPATCHERS.insert(0, dispatch_bnb)
