"""LoRA around `nn.Conv2d`: A is a conv with the base's kernel (c_in -> r), B a 1x1 conv (r -> c_out)."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .functional import conv2d_delta_weight
from .layer import LoraLayer


class Conv2d(nn.Module, LoraLayer):
    """`y = base(x) + s * B(A(dropout(x)))`; merging adds the composed kernel to the base kernel."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        if base_layer.groups != 1:
            raise ValueError(f"LoRA supports Conv2d with groups=1 only, got groups={base_layer.groups}.")
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)

    def _make_factors(self, adapter_name: str, r: int) -> None:
        base = self.get_base_layer()
        self.lora_A[adapter_name] = nn.Conv2d(
            self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
        )
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, (1, 1), (1, 1), bias=False)

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return conv2d_delta_weight(A, B, self.scaling[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._delta_fp32(adapter_name).to(self.get_base_layer().weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base_forward(x, *args, **kwargs)
        return self._add_lora_branches(x, result, result.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
