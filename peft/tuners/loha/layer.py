"""LoHa layers: `delta W = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)` added to a Linear / Conv1d / Conv2d weight."""

from __future__ import annotations

import torch
from torch import nn

from ..lycoris_common.layer import LycorisLayerBase, kaiming
from .math import hadamard_delta, hadamard_delta_cp, loha_shapes


class LoHaLayer(LycorisLayerBase):
    """Per-adapter LoHa factors: `hada_w{1,2}_{a,b}[name]` and, for the effective conv form, `hada_t{1,2}[name]`."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    method_name = "LoHa"
    rescale_rank_dropout_always = True

    def _factor_shapes(self, r: int, config) -> dict[str, tuple[int, ...]]:
        return loha_shapes(self.out_features, self._in_per_group(), self._conv_kernel(), r,
                           bool(config.use_effective_conv2d))

    def _init_factors(self, adapter_name: str, init_weights) -> None:
        """True: every factor Kaiming-uniform but W2b zero (`delta W = 0`); False: every factor Kaiming-uniform."""
        for attr in self.adapter_layer_names:
            if adapter_name in getattr(self, attr):
                kaiming(getattr(self, attr)[adapter_name])
        if init_weights:
            nn.init.zeros_(self.hada_w2_b[adapter_name])

    def _delta(self, adapter_name: str) -> torch.Tensor:
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        scale = self.scaling[adapter_name]
        if adapter_name in self.hada_t1:
            delta = hadamard_delta_cp(self.hada_t1[adapter_name], w1a, w1b, self.hada_t2[adapter_name], w2a, w2b,
                                      scale)
        else:
            delta = hadamard_delta(w1a, w1b, w2a, w2b, scale)
        return delta.reshape(self.get_base_layer().weight.shape)


class Linear(nn.Module, LoHaLayer):
    """LoHa around `nn.Linear`: `y = base(x) + x delta W^T`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 8, alpha: float = 8, **kwargs):
        LoHaLayer.__init__(self, base_layer)
        self._start(adapter_name, config, r, alpha)

    forward = LycorisLayerBase.forward  # nn.Module comes first in the bases

    def __repr__(self) -> str:
        return "loha." + super().__repr__()


class Conv2d(Linear):
    """LoHa around `nn.Conv2d` (the update is a conv with the base's stride, padding, dilation and groups)."""


class Conv1d(Linear):
    """LoHa around `nn.Conv1d`."""
