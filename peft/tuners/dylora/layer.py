"""DyLoRA layers: `DyLoRALayer` (per-adapter factors, rank choice, merge, unmerge) and `Linear` (nn.Linear and
transformers' Conv1D)."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..krona.layer import linear_features
from ..tuners_utils import BaseTunerLayer
from .rank_math import RankSampler, dylora_scale, trained_rows, truncated_apply, truncated_delta


class DyLoRALayer(BaseTunerLayer):
    """Per-adapter DyLoRA state around `base_layer`: `dylora_A[name]` (r x in), `dylora_B[name]` (out x r), the
    largest rank, alpha, the rank used outside training (`dylora_eval_rank`) and the shared `RankSampler`."""

    adapter_layer_names = ("dylora_A", "dylora_B")
    other_param_names = ("dylora_r", "dylora_r_min", "dylora_alpha", "dylora_eval_rank", "dylora_update_mode",
                         "dylora_sampler", "dylora_dropout", "dylora_fixed_scale", "scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.dylora_A = nn.ParameterDict({})
        self.dylora_B = nn.ParameterDict({})
        self.dylora_dropout = nn.ModuleDict({})
        self.dylora_r: dict[str, int] = {}
        self.dylora_r_min: dict[str, int] = {}
        self.dylora_alpha: dict[str, float] = {}
        self.dylora_eval_rank: dict[str, int] = {}
        self.dylora_update_mode: dict[str, str] = {}
        self.dylora_sampler: dict[str, RankSampler] = {}
        self.dylora_fixed_scale: dict[str, bool] = {}
        # an extra factor on the update, 1.0 (the name `peft.helpers.rescale_adapter_scale` multiplies)
        self.scaling: dict[str, float] = {}
        self._merged_rank: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = linear_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, sampler: RankSampler, r_min: int = 1,
                     lora_dropout: float = 0.0, update_mode: str = "frozen", eval_rank: Optional[int] = None,
                     init_lora_weights=True, fixed_scale: bool = False) -> None:
        base = self.get_base_layer()
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(r, self.in_features, dtype=dtype)  # on meta inside BaseTuner's low_cpu_mem_usage context
        B = torch.empty(self.out_features, r, dtype=dtype)
        if not A.is_meta and not base.weight.is_meta:
            A, B = A.to(base.weight.device), B.to(base.weight.device)
        self.dylora_A[adapter_name] = nn.Parameter(A)
        self.dylora_B[adapter_name] = nn.Parameter(B)
        self.dylora_r[adapter_name], self.dylora_r_min[adapter_name] = r, r_min
        self.dylora_alpha[adapter_name] = float(lora_alpha)
        self.dylora_update_mode[adapter_name] = update_mode
        self.dylora_fixed_scale[adapter_name] = bool(fixed_scale)
        self.scaling[adapter_name] = 1.0
        self.dylora_sampler[adapter_name] = sampler
        self.dylora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.set_rank(adapter_name, r if eval_rank is None else eval_rank)
        self.reset_dylora_parameters(adapter_name, init_lora_weights)
        self.set_adapter(self.active_adapters)

    def reset_dylora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """True: A Kaiming-uniform (a = sqrt(5)), B zero; "gaussian": A ~ N(0, 1/r^2), B zero; False: B random too."""
        A, B = self.dylora_A[adapter_name], self.dylora_B[adapter_name]
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / self.dylora_r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    def set_rank(self, adapter_name: str, rank: int) -> None:
        """Use rank `rank` (1 <= rank <= r) outside training and for merging. Refused while the adapter is merged."""
        r = self.dylora_r[adapter_name]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
            raise ValueError(f"Invalid rank={rank!r} for adapter {adapter_name!r}: expected an int in [1, {r}].")
        if adapter_name in self.merged_adapters and rank != self._merged_rank.get(adapter_name):
            raise ValueError(f"Invalid rank={rank} for adapter {adapter_name!r}: it is merged at rank "
                             f"{self._merged_rank[adapter_name]}; unmerge it first.")
        self.dylora_eval_rank[adapter_name] = rank

    def current_rank(self, adapter_name: str) -> int:
        """The sampled rank in training mode, else the eval rank."""
        if self.training:
            return self.dylora_sampler[adapter_name].rank_for(id(self))
        return self.dylora_eval_rank[adapter_name]

    def scale(self, adapter_name: str, b: int) -> float:
        """`alpha / b` (the paper), or `alpha / r` with `fixed_scale` (times `scaling[name]`, 1 unless rescaled)."""
        base = dylora_scale(self.dylora_alpha[adapter_name], b, self.dylora_r[adapter_name],
                            self.dylora_fixed_scale[adapter_name])
        return self.scaling[adapter_name] * base

    # --- merge --------------------------------------------------------------------------------------------------
    def _delta(self, adapter_name: str, rank: int) -> torch.Tensor:
        A, B = self.dylora_A[adapter_name], self.dylora_B[adapter_name]
        dtype = torch.promote_types(A.dtype, torch.float32)
        delta = truncated_delta(A.to(dtype), B.to(dtype), rank, self.scale(adapter_name, rank))
        return delta.T if self.fan_in_fan_out else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s_b B[:, :b] A[:b]` at the eval rank b (`s_b = alpha / b`, or `alpha / r` with fixed_scale), shaped and
        typed like the stored base weight."""
        return self._delta(adapter_name, self.dylora_eval_rank[adapter_name]).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each adapter's update at its eval rank to the base weight (in at least fp32, rounded once)."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        weight = self.get_base_layer().weight
        for name in names:
            if name not in self.dylora_A or name in self.merged_adapters:
                continue
            rank = self.dylora_eval_rank[name]
            delta = self._delta(name, rank)
            merged = (weight.data.to(delta.dtype) + delta).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data.copy_(merged)
            self.merged_adapters.append(name)
            self._merged_rank[name] = rank

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self._delta(name, self._merged_rank.pop(name))
            weight.data.copy_((weight.data.to(delta.dtype) - delta).to(weight.dtype))

    # --- forward ------------------------------------------------------------------------------------------------
    def _adapter_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for name in self.active_adapters:
            if name not in self.dylora_A:
                continue
            A, B = self.dylora_A[name], self.dylora_B[name]
            b = self.current_rank(name)
            lo = trained_rows(b, self.dylora_r_min[name], self.dylora_update_mode[name])[0] if self.training else 0
            h = self.dylora_dropout[name](x.to(A.dtype) if getattr(self, "cast_input_dtype_enabled", True) else x)
            result = result + truncated_apply(h, A, B, b, self.scale(name, b), lo).to(result.dtype)
        return result


class Linear(nn.Module, DyLoRALayer):
    """DyLoRA around an nn.Linear (or transformers' Conv1D): `y = base(x) + (alpha / b) x A[:b]^T B[:, :b]^T`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False, **kwargs) -> None:
        super().__init__()
        DyLoRALayer.__init__(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out or type(base_layer).__name__ == "Conv1D"
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

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
        return "dylora." + super().__repr__()
