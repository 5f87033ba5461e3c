"""KronA layers: `KronALayer` (per-adapter Kronecker factors, merge, unmerge) and `Linear` (nn.Linear and
transformers' Conv1D)."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..tuners_utils import BaseTunerLayer
from .kron_math import FactorSpec, factor_shapes, kron_apply, kron_delta


def linear_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight stored in x out)."""
    if type(base_layer).__name__ == "Conv1D":
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    raise ValueError(f"Invalid target module {type(base_layer).__name__}: expected torch.nn.Linear or "
                     "transformers' Conv1D (KronA supports only these).")


def _factor_dtype(base: nn.Module) -> torch.dtype:
    """fp32 for fp16/bf16 bases (stable training), the base dtype for fp32 / fp64 bases."""
    dtype = base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class KronALayer(BaseTunerLayer):
    """Per-adapter KronA state around `base_layer`: `krona_A[name]` (a1 x a2), `krona_B[name]` (b1 x b2), the scale
    `scaling[name]` (s)."""

    adapter_layer_names = ("krona_A", "krona_B")
    other_param_names = ("scaling", "krona_dropout", "krona_shape")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.krona_A = nn.ParameterDict({})
        self.krona_B = nn.ParameterDict({})
        self.krona_dropout = nn.ModuleDict({})
        self.scaling: dict[str, float] = {}  # s per adapter (the name `peft.helpers.rescale_adapter_scale` reads)
        self.krona_shape: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = self._features()

    def _features(self) -> tuple[int, int]:
        """(in, out) of the matrix the update is shaped like (Conv2d: in_channels * kh * kw, out_channels)."""
        return linear_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, krona_dim: FactorSpec, krona_scale: float, krona_dropout: float = 0.0,
                     init_weights=True, where: str = "") -> None:
        """Add adapter `adapter_name`: A of shape (a1, a2), B of shape (out/a1, in/a2) (see `factor_shapes`)."""
        (a1, a2), (b1, b2) = factor_shapes(self.out_features, self.in_features, krona_dim, where)
        base = self.get_base_layer()
        dtype = _factor_dtype(base)
        A = torch.empty(a1, a2, dtype=dtype)  # on meta inside BaseTuner's low_cpu_mem_usage context
        B = torch.empty(b1, b2, dtype=dtype)
        if not A.is_meta and not base.weight.is_meta:
            A, B = A.to(base.weight.device), B.to(base.weight.device)
        self.krona_A[adapter_name] = nn.Parameter(A)
        self.krona_B[adapter_name] = nn.Parameter(B)
        self.krona_shape[adapter_name] = ((a1, a2), (b1, b2))
        self.scaling[adapter_name] = float(krona_scale)
        self.krona_dropout[adapter_name] = nn.Dropout(krona_dropout) if krona_dropout > 0 else nn.Identity()
        self.reset_krona_parameters(adapter_name, init_weights)
        self.set_adapter(self.active_adapters)

    def reset_krona_parameters(self, adapter_name: str, init_weights) -> None:
        """True: A Kaiming-uniform (a = sqrt(5)), B zero; "a_zero": A zero, B Kaiming-uniform; False: both
        Kaiming-uniform (the update is not zero)."""
        A, B = self.krona_A[adapter_name], self.krona_B[adapter_name]
        for tensor in (A, B):
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        if init_weights is True:
            nn.init.zeros_(B)
        elif init_weights == "a_zero":
            nn.init.zeros_(A)

    # --- merge --------------------------------------------------------------------------------------------------
    def _delta(self, adapter_name: str) -> torch.Tensor:
        """`s * kron(A, B)` in at least fp32, shaped like the stored base weight (transposed for Conv1D, reshaped
        to the kernel for Conv2d)."""
        A, B = self.krona_A[adapter_name], self.krona_B[adapter_name]
        dtype = torch.promote_types(A.dtype, torch.float32)
        delta = kron_delta(A.to(dtype), B.to(dtype), self.scaling[adapter_name])
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.reshape(self.get_base_layer().weight.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._delta(adapter_name).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each adapter's `s * kron(A, B)` to the base weight (in at least fp32, rounded once)."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        weight = self.get_base_layer().weight
        for name in names:
            if name not in self.krona_A or name in self.merged_adapters:
                continue
            delta = self._delta(name)
            merged = (weight.data.to(delta.dtype) + delta).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self._delta(name)
            weight.data.copy_((weight.data.to(delta.dtype) - delta).to(weight.dtype))

    # --- forward ------------------------------------------------------------------------------------------------
    def _adapter_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for name in self.active_adapters:
            if name not in self.krona_A:
                continue
            A, B = self.krona_A[name], self.krona_B[name]
            h = self.krona_dropout[name](x.to(A.dtype) if getattr(self, "cast_input_dtype_enabled", True) else x)
            result = result + (kron_apply(h, A, B) * self.scaling[name]).to(result.dtype)
        return result


class Linear(nn.Module, KronALayer):
    """KronA around an nn.Linear (or transformers' Conv1D, `fan_in_fan_out=True`):
    `y = base(x) + s * x @ kron(A, B)^T`, computed as `vec_row(A X B^T)` without forming `kron(A, B)`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, krona_dim: FactorSpec = None, krona_scale: float = 1.0,
                 krona_dropout: float = 0.0, init_weights=True, fan_in_fan_out: bool = False, where: str = "") -> None:
        super().__init__()
        KronALayer.__init__(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out or type(base_layer).__name__ == "Conv1D"
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, krona_dim, krona_scale, krona_dropout, init_weights, where)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        return self._adapter_output(x, result)

    def __repr__(self) -> str:
        return "krona." + super().__repr__()
