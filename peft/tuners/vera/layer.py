"""VeRA layers: `VeraLayer` (per-adapter scaling vectors around a base layer) and `Linear` (nn.Linear / Conv1D).

The shared projections live on the tuner model (`VeraModel.vera_A` / `vera_B`, one entry per adapter); a layer only
keeps a plain (unregistered) reference to those two dicts, so they appear once in every state dict.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..tuner_layer import BaseTunerLayer
from .merging import DeltaMergeMixin, _at_least_fp32
from .projections import vera_delta_weight, vera_update


def linear_features(base_layer: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of an `nn.Linear` or transformers `Conv1D` (weight stored (in, out)); else None."""
    if type(base_layer).__name__ == "Conv1D":
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    return None


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """fp32 for half-precision bases, else the base weight's dtype (fp32 / fp64)."""
    dtype = base_layer.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class VeraLayer(DeltaMergeMixin, BaseTunerLayer):
    """`vera_lambda_d[name]` (r,) and `vera_lambda_b[name]` (out,) around `base_layer`; `r[name]`."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout")

    def __init__(self, base_layer: nn.Module, shared: tuple) -> None:
        features = linear_features(base_layer)
        if features is None:
            raise ValueError(f"Invalid target module of type {type(base_layer).__name__}: VeRA adapts only "
                             "torch.nn.Linear and transformers' Conv1D.")
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self._vera_shared = shared  # (vera_A, vera_B) BufferDicts of the tuner model; a tuple is not registered
        self.r: dict[str, int] = {}
        # dropout probabilities, applied functionally: no submodule that a regex target could match
        self.vera_dropout: dict[str, float] = {}
        self.vera_lambda_b = nn.ParameterDict({})
        self.vera_lambda_d = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    @property
    def vera_A(self):
        """The tuner model's shared `vera_A` store (adapter -> (r, max_in) tensor); not a submodule of the layer."""
        return self._vera_shared[0]

    @property
    def vera_B(self):
        """The tuner model's shared `vera_B` store (adapter -> (max_out, r) tensor); not a submodule of the layer."""
        return self._vera_shared[1]

    def projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared (A, B) of `adapter_name` (full size; slice with `in_features` / `out_features`)."""
        vera_A, vera_B = self._vera_shared
        return vera_A[adapter_name], vera_B[adapter_name]

    def update_layer(self, adapter_name: str, config) -> None:
        """Add adapter `adapter_name`: `vera_lambda_b = 0`, `vera_lambda_d = d_initial` with `init_weights`, else
        ones and standard-normal draws."""
        A, B = self.projections(adapter_name)
        if A.shape[1] < self.in_features or B.shape[0] < self.out_features or A.shape[0] != config.r:
            raise ValueError(f"Invalid VeRA projections for adapter {adapter_name!r}: A {tuple(A.shape)}, B "
                             f"{tuple(B.shape)}; expected A ({config.r}, >= {self.in_features}) and B "
                             f"(>= {self.out_features}, {config.r}).")
        base = self.get_base_layer()
        weight = base.weight
        kwargs = {"dtype": adapter_dtype(base), "device": None if weight.is_meta else weight.device}
        self.r[adapter_name] = config.r
        self.vera_dropout[adapter_name] = float(config.vera_dropout)
        if config.init_weights:
            lambda_b = torch.zeros(self.out_features, **kwargs)
            lambda_d = torch.full((config.r,), float(config.d_initial), **kwargs)
        else:
            lambda_b = torch.ones(self.out_features, **kwargs)
            lambda_d = torch.randn(config.r, **kwargs)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self.set_adapter(self.active_adapters)

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        lambda_d = _at_least_fp32(self.vera_lambda_d[adapter_name].detach())
        lambda_b = _at_least_fp32(self.vera_lambda_b[adapter_name].detach())
        A, B = (t.to(device=lambda_d.device, dtype=lambda_d.dtype) for t in self.projections(adapter_name))
        return vera_delta_weight(A, B, lambda_d, lambda_b, self.in_features)

    def __repr__(self) -> str:
        return "vera." + super().__repr__()


class Linear(nn.Module, VeraLayer):
    """VeRA around an `nn.Linear` or a transformers `Conv1D`: `y = base(x) + sum_a lambda_b (B (lambda_d (A x)))`."""

    def __init__(self, base_layer: nn.Module, shared: tuple, adapter_name: str, config) -> None:
        super().__init__()
        VeraLayer.__init__(self, base_layer, shared)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.vera_lambda_d:
                continue
            lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
            A, B = (t.to(device=x.device, dtype=lambda_d.dtype) for t in self.projections(name))
            h = x.to(lambda_d.dtype)
            if self.vera_dropout[name] > 0:
                h = F.dropout(h, self.vera_dropout[name], training=self.training)
            result = result + vera_update(h, A, B, lambda_d, lambda_b).to(out_dtype)
        return result
