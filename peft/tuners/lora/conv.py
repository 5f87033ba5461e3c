"""LoRA around `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`, grouped or not (the math: `conv_math`).

A is a dense conv with the base's kernel size, stride, padding, dilation and padding mode (c_in -> r); B a pointwise
conv (r -> c_out) with the base's groups, so `r` must be a multiple of `groups`. Weights, as in upstream PEFT:
`lora_A` (r, c_in, *k), `lora_B` (c_out, r / groups, *1). Merging needs the composed kernel to fit the base kernel,
which holds for `groups = 1` only: a grouped layer computes its adapter in the forward and refuses to merge.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .conv_math import check_rank_divides_groups, conv_delta_kernel
from .layer import LoraLayer
from .mixed_batch import mixed_forward


class ConvMergeError(ValueError, NotImplementedError):
    """Merging a grouped conv's adapter: its dense update has no place in the grouped base kernel. A `ValueError`
    like every refusal here, and a `NotImplementedError` like upstream's."""


class _ConvNd(nn.Module, LoraLayer):
    """`y = base(x) + s * B(A(dropout(x)))`; for `groups = 1` merging adds `s * K` (`conv_delta_kernel`) to the
    base kernel. Subclasses fix the dimension through `conv_cls`."""

    conv_cls: type[nn.Module] = nn.Conv2d

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, self.conv_cls):
            raise ValueError(f"lora.{type(self).__name__} wraps a {self.conv_cls.__name__}, got {type(base).__name__}.")
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        extra = {k: True for k in ("lora_bias", "use_dora") if kwargs.get(k)}  # B's bias (c_out,); DoRA
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, **extra)

    @property
    def groups(self) -> int:
        return self.get_base_layer().groups

    def update_layer(self, adapter_name: str, r: int, *args, **kwargs) -> None:
        """Checks `r` against the base's groups before anything of the adapter exists, then `LoraLayer`'s."""
        if isinstance(r, int) and r > 0:
            check_rank_divides_groups(r, self.groups, f" of {self.get_base_layer()} (adapter {adapter_name!r})",
                                      kind=type(self.get_base_layer()).__name__)
        super().update_layer(adapter_name, r, *args, **kwargs)

    def _make_factors(self, adapter_name: str, r: int) -> None:
        base = self.get_base_layer()
        ones = (1,) * len(base.kernel_size)
        self.lora_A[adapter_name] = self.conv_cls(
            self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B[adapter_name] = self.conv_cls(r, self.out_features, ones, ones, groups=base.groups, bias=False)

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        """`s * K` (c_out, c_in, *k) in at least fp32; for `groups > 1` a dense kernel, wider than the base's."""
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return conv_delta_kernel(A, B, self.scaling[adapter_name], self.groups)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._delta_fp32(adapter_name).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if self.groups > 1 and self._adapters_to_merge(adapter_names):
            raise ConvMergeError(
                f"Cannot merge LoRA into {self.get_base_layer()} with groups={self.groups}: the adapter's update is a "
                "dense kernel over all input channels, the base kernel holds only each group's block (upstream "
                "PEFT refuses this merge as well). Use the unmerged adapter; nothing was merged."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    supports_mixed_batch = True  # `adapter_names=[...]`: one adapter per sample (see .mixed_batch)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if "adapter_names" in kwargs:
            return mixed_forward(self, x, kwargs.pop("adapter_names"), *args, **kwargs)
        result = self._base_forward(x, *args, **kwargs)
        return self._add_lora_branches(x, result, result.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Conv1d(_ConvNd):
    conv_cls = nn.Conv1d


class Conv2d(_ConvNd):
    conv_cls = nn.Conv2d


class Conv3d(_ConvNd):
    conv_cls = nn.Conv3d
