"""`LycorisLayerBase`: per-adapter bookkeeping, forward, merge and unmerge shared by LoHa and LoKr layers.

A subclass names its factor containers in `adapter_layer_names` (each an `nn.ParameterDict`, adapter -> tensor)
and implements two things: `_factor_shapes(r, config)` (container -> shape of that adapter's tensor, from the base
weight's shape) with `_init_factors(adapter_name, init_weights)`, and `_delta(adapter_name)`, the scaled update
`delta W` shaped like the base weight. Everything else (forward, dropouts, merge) is here.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..tuner_layer import BaseTunerLayer
from .math import adapter_dtype, at_least_fp32, row_dropout_mask

SUPPORTED_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class UnsupportedTargetError(TypeError, ValueError):
    """A targeted module whose type the method has no layer for (a TypeError, as upstream, and a ValueError)."""


def kaiming(tensor: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LycorisLayerBase(BaseTunerLayer):
    """Adds `sum_a delta W_a` (each computed from its adapter's factors) to a Linear / Conv base layer."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")
    method_name = "LyCORIS"
    # Rank dropout divides the kept rows by the kept fraction: LoHa always (upstream), LoKr per `rank_dropout_scale`.
    rescale_rank_dropout_always = False

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        if not isinstance(base_layer, SUPPORTED_BASES):
            raise UnsupportedTargetError(
                f"Target module of type {type(base_layer)} not supported by {self.method_name}: expected one of "
                f"{', '.join(t.__name__ for t in SUPPORTED_BASES)}.")
        self.base_layer = base_layer
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict({}))
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def _start(self, adapter_name: str, config, r: int, alpha: float) -> None:
        """Constructor tail of the concrete layers: the first adapter, made active."""
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, config)

    # --- subclass hooks -----------------------------------------------------------------------------------------
    def _factor_shapes(self, r: int, config) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _init_factors(self, adapter_name: str, init_weights) -> None:
        raise NotImplementedError

    def _delta(self, adapter_name: str) -> torch.Tensor:
        """`delta W` of `adapter_name` (scale included), shaped like the base weight, in the factors' dtype."""
        raise NotImplementedError

    # --- creation -----------------------------------------------------------------------------------------------
    def _conv_kernel(self) -> tuple[int, ...]:
        base = self.get_base_layer()
        return tuple(base.kernel_size) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else ()

    def _in_per_group(self) -> int:
        base = self.get_base_layer()
        return self.in_features // getattr(base, "groups", 1)

    def update_layer(self, adapter_name: str, r: int, alpha: float, config, **kwargs) -> None:
        """Add adapter `adapter_name` (rank `r`, scale `alpha / r`) with the options of `config`."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"Invalid r={r!r} for {self.method_name} adapter {adapter_name!r}: expected a positive "
                             "int.")
        shapes = self._factor_shapes(r, config)
        weight = self.get_base_layer().weight
        dtype = adapter_dtype(weight)
        for attr, shape in shapes.items():
            tensor = torch.empty(shape, dtype=dtype)  # on meta inside BaseTuner's low_cpu_mem_usage context
            if not tensor.is_meta and not weight.is_meta:
                tensor = tensor.to(weight.device)
            getattr(self, attr)[adapter_name] = nn.Parameter(tensor)
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = bool(getattr(config, "rank_dropout_scale", False))
        self.module_dropout[adapter_name] = config.module_dropout
        with torch.no_grad():
            self._init_factors(adapter_name, config.init_weights)
        self.set_adapter(self.active_adapters)

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in self.r and any(adapter_name in getattr(self, a) for a in self.adapter_layer_names)

    # --- scale (upstream's helpers) -----------------------------------------------------------------------------
    def set_scale(self, adapter: str, scale: float) -> None:
        if self._has(adapter):
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        for name in self.active_adapters:
            if self._has(name):
                self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for name in self.active_adapters:
            if self._has(name):
                self.scaling[name] = self.alpha[name] / self.r[name] if scale is None else self.scaling[name] / scale

    # --- forward ------------------------------------------------------------------------------------------------
    def _apply_weight(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with weight `delta` and no bias (padding mode, stride, groups as the base)."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return nn.functional.linear(x, delta)
        return base._conv_forward(x, delta, None)

    def _training_delta(self, adapter_name: str) -> torch.Tensor:
        delta = self._delta(adapter_name)
        p = self.rank_dropout[adapter_name]
        if self.training and p > 0:
            rescale = self.rescale_rank_dropout_always or self.rank_dropout_scale[adapter_name]
            delta = delta * row_dropout_mask(delta.shape[0], p, rescale, delta)
        return delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`base(x) + sum_a op(x, delta W_a)` over the active adapters (`op`: the base layer's linear map)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if not self._has(name):
                continue
            p = self.module_dropout[name]
            if self.training and p > 0 and not bool(torch.rand(1) > p):
                continue
            delta = self._training_delta(name)
            h = x.to(delta.dtype) if self.cast_input_dtype_enabled else x
            result = result + self._apply_weight(h, delta)
        return result.to(out_dtype)

    # --- merge --------------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`delta W` of `adapter_name`, shaped like the base weight, in the base weight's dtype."""
        return self._delta(adapter_name).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the named (default: active) adapters' `delta W` to the base weight, in at least fp32, rounding once.
        With `safe_merge`, a non-finite result raises ValueError and nothing changes."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if self._has(n) and n not in self.merged_adapters]
        if not names:
            if self.merged:
                warnings.warn("All adapters are already merged, nothing to do.")
            return
        base = self.get_base_layer()
        weight = at_least_fp32(base.weight.detach())
        with torch.no_grad():
            for name in names:
                weight = weight + self._delta(name).detach().to(weight.dtype)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights: merging adapters {names} gives NaN/Inf; the "
                             "adapter seems to be broken. Nothing merged.")
        base.weight.data = weight.to(base.weight.dtype)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's `delta W` again (most recent first), rounding once."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        weight = at_least_fp32(base.weight.detach())
        with torch.no_grad():
            for name in reversed(self.merged_adapters):
                if self._has(name):
                    weight = weight - self._delta(name).detach().to(weight.dtype)
        base.weight.data = weight.to(base.weight.dtype)
        self.merged_adapters.clear()
