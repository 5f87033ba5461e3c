"""LoKr layers: `delta W = (alpha / r) * W1 ⊗ W2` added to a Linear / Conv1d / Conv2d weight."""

from __future__ import annotations

import torch
from torch import nn

from ..lycoris_common.layer import LycorisLayerBase, kaiming
from .math import kron_delta, lokr_shapes, w2_from_core


class LoKrLayer(LycorisLayerBase):
    """Per-adapter LoKr factors: `lokr_w1` or `lokr_w1_a/_b`; `lokr_w2`, `lokr_w2_a/_b`, or those with `lokr_t2`."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    method_name = "LoKr"

    def _factor_shapes(self, r: int, config) -> dict[str, tuple[int, ...]]:
        kernel = self._conv_kernel()
        return lokr_shapes(self.out_features, self._in_per_group(), kernel, r, config.decompose_factor,
                           config.decompose_both, bool(config.use_effective_conv2d) and bool(kernel))

    def _init_factors(self, adapter_name: str, init_weights) -> None:
        """Every factor Kaiming-uniform, then True zeroes W1 (`lokr_w1`, or `lokr_w1_a`), "lycoris" zeroes W2
        (`lokr_w2`, or `lokr_w2_b`); either way `delta W = 0`. False zeroes nothing."""
        for attr in self.adapter_layer_names:
            if adapter_name in getattr(self, attr):
                kaiming(getattr(self, attr)[adapter_name])
        if init_weights == "lycoris":
            target = self.lokr_w2 if adapter_name in self.lokr_w2 else self.lokr_w2_b
        elif init_weights:
            target = self.lokr_w1 if adapter_name in self.lokr_w1 else self.lokr_w1_a
        else:
            return
        nn.init.zeros_(target[adapter_name])

    def _w1(self, name: str) -> torch.Tensor:
        if name in self.lokr_w1:
            return self.lokr_w1[name]
        return self.lokr_w1_a[name] @ self.lokr_w1_b[name]

    def _w2(self, name: str) -> torch.Tensor:
        if name in self.lokr_w2:
            return self.lokr_w2[name]
        if name in self.lokr_t2:
            return w2_from_core(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        return self.lokr_w2_a[name] @ self.lokr_w2_b[name]

    def _delta(self, adapter_name: str) -> torch.Tensor:
        delta = kron_delta(self._w1(adapter_name), self._w2(adapter_name), self.scaling[adapter_name])
        return delta.reshape(self.get_base_layer().weight.shape)


class Linear(nn.Module, LoKrLayer):
    """LoKr around `nn.Linear`: `y = base(x) + x delta W^T`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 8, alpha: float = 8, **kwargs):
        LoKrLayer.__init__(self, base_layer)
        self._start(adapter_name, config, r, alpha)

    forward = LycorisLayerBase.forward  # nn.Module comes first in the bases

    def __repr__(self) -> str:
        return "lokr." + super().__repr__()


class Conv2d(Linear):
    """LoKr around `nn.Conv2d` (the update is a conv with the base's stride, padding, dilation and groups)."""


class Conv1d(Linear):
    """LoKr around `nn.Conv1d`."""
