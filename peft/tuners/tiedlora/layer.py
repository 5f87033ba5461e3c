"""Tied-LoRA layers: `TiedLoraLayer` (per-layer vectors u, v around a base layer) and `Linear` (nn.Linear / Conv1D).

The tied A and B of each shape group live on the tuner model (`TiedLoraModel.tied_A[adapter][group]`); a layer
reads them through a plain (unregistered) reference to those dicts. When they train (`train_shared`), the layer
also lists the very same `nn.Parameter` objects in its `tied_A` / `tied_B` containers, so that the generic
adapter machinery (set_adapter, enable / disable, inference mode) switches their gradients with the layer's; they
are saved once, by the tuner model (`base_model.tied_A.<group>`), never per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..tuner_layer import BaseTunerLayer
from ..vera.layer import adapter_dtype, linear_features
from ..vera.merging import DeltaMergeMixin, _at_least_fp32
from .tied_math import shape_group, tied_delta_weight, tied_update


class TiedLoraLayer(DeltaMergeMixin, BaseTunerLayer):
    """`tied_u[name]` (r,), `tied_v[name]` (out,) (with `train_scalings`), aliases of the tied `tied_A[name]`,
    `tied_B[name]` (with `train_shared`); `r`, `scaling` and `group` per adapter."""

    adapter_layer_names = ("tied_A", "tied_B", "tied_u", "tied_v")
    other_param_names = ("r", "scaling", "group", "tied_dropout")

    def __init__(self, base_layer: nn.Module, shared: tuple) -> None:
        features = linear_features(base_layer)
        if features is None:
            raise ValueError(f"Invalid target module of type {type(base_layer).__name__}: Tied-LoRA adapts only "
                             "torch.nn.Linear and transformers' Conv1D.")
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self._tied_shared = shared  # (tied_A, tied_B) ModuleDicts of the tuner model; a tuple is not registered
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.group: dict[str, str] = {}
        self.tied_dropout = nn.ModuleDict({})
        self.tied_A = nn.ParameterDict({})
        self.tied_B = nn.ParameterDict({})
        self.tied_u = nn.ParameterDict({})
        self.tied_v = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    def shared_pair(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The tied (A (r, in), B (out, r)) this layer uses for `adapter_name`."""
        tied_A, tied_B = self._tied_shared
        group = self.group[adapter_name]
        return tied_A[adapter_name][group], tied_B[adapter_name][group]

    def vectors(self, adapter_name: str) -> tuple[Optional[nn.Parameter], Optional[nn.Parameter]]:
        """(u, v) of `adapter_name`, None where fixed to ones (`train_scalings=False`)."""
        return self.tied_u.get(adapter_name), self.tied_v.get(adapter_name)

    def update_layer(self, adapter_name: str, config) -> None:
        """Add adapter `adapter_name`; its tied pair must already exist on the tuner model (`TiedLoraModel`)."""
        self.group[adapter_name] = shape_group(self.in_features, self.out_features)
        A, B = self.shared_pair(adapter_name)
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.lora_alpha / config.r
        self.tied_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        if config.train_shared:
            self.tied_A[adapter_name], self.tied_B[adapter_name] = A, B  # the same Parameter objects: aliases
        if config.train_scalings:
            base = self.get_base_layer()
            device = None if base.weight.is_meta else base.weight.device
            kwargs = {"dtype": adapter_dtype(base), "device": device}
            v = torch.zeros if config.init_weights else torch.ones
            self.tied_u[adapter_name] = nn.Parameter(torch.ones(config.r, **kwargs))
            self.tied_v[adapter_name] = nn.Parameter(v(self.out_features, **kwargs))
        self.set_adapter(self.active_adapters)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """Only the per-layer vectors; the tied pair is saved once by the tuner model."""
        out = super().adapter_state_dict_load_map(adapter_name)
        return {k: v for k, v in out.items() if k.split(".")[0] in ("tied_u", "tied_v")}

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        A, B = (_at_least_fp32(t.detach()) for t in self.shared_pair(adapter_name))
        u, v = (None if t is None else _at_least_fp32(t.detach()).to(A.device) for t in self.vectors(adapter_name))
        return tied_delta_weight(A, B.to(A.device), u, v, self.scaling[adapter_name])

    def __repr__(self) -> str:
        return "tiedlora." + super().__repr__()


class Linear(nn.Module, TiedLoraLayer):
    """Tied-LoRA around an `nn.Linear` or a transformers `Conv1D`: `y = base(x) + sum_a s v * (B (u * (A x)))`."""

    def __init__(self, base_layer: nn.Module, shared: tuple, adapter_name: str, config) -> None:
        super().__init__()
        TiedLoraLayer.__init__(self, base_layer, shared)
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
            if name not in self.group:
                continue
            A, B = self.shared_pair(name)
            u, v = self.vectors(name)
            h = self.tied_dropout[name](x.to(A.dtype))
            result = result + tied_update(h, A, B, u, v, self.scaling[name]).to(out_dtype)
        return result
