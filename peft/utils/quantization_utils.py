"""Quantization backend descriptors (upstream's `peft.utils.quantization_utils` names).

A backend object says which quantization library holds a tuner layer's base weight (`backend_name`, reported by
`get_layer_status()` / `get_model_status()` when set as `layer.quantization_backend`) and how to read the base
weight as a float tensor and write a float tensor back. The bitsandbytes work is done by `peft.utils.quantization`;
these classes only route to it.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantization import dequantize_bnb_layer, replace_bnb_weight


class QuantizationBackend:
    """Base descriptor: `backend_name` for status reports, plus dequantize / requantize of a layer's base weight."""

    backend_name: str = ""
    supports_merge: bool = False

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError(f"Dequantization is not supported for {self.backend_name or 'this'} backend.")

    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        raise NotImplementedError(f"Requantization is not supported for {self.backend_name or 'this'} backend.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend_name={self.backend_name!r})"


class _BnbBackend(QuantizationBackend):
    supports_merge = True

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return dequantize_bnb_layer(base_layer)

    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        replace_bnb_weight(peft_layer.get_base_layer(), weight_data)


class Bnb8bitBackend(_BnbBackend):
    """bitsandbytes `Linear8bitLt` base layers."""

    backend_name = "bnb 8bit"


class Bnb4bitBackend(_BnbBackend):
    """bitsandbytes `Linear4bit` base layers."""

    backend_name = "bnb 4bit"
