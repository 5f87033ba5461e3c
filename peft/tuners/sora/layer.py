"""SoRA layers: `SoraLayer` (per-adapter A, B, gate; merge, unmerge, compaction) and `Linear` (nn.Linear, or
GPT-2's Conv1D with `fan_in_fan_out=True`).

Forward: `y = base(x) + s * B (g ⊙ (A dropout(x)))` for each active adapter. Files hold, per adapted module,
`sora_A.weight` (r x in), `sora_B.weight` (out x r) and `sora_gate` (r,).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..tuners_utils import BaseTunerLayer
from .functional import compact_factors, sora_delta_weight, sora_scaling


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (weight stored in x out)."""
    if type(base).__name__ == "Conv1D":
        return base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    raise ValueError(f"Invalid target module of type {type(base).__name__}: SoRA adapts nn.Linear and "
                     "transformers' Conv1D only.")


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """The base dtype for fp32 / fp64 bases; fp32 for half-precision bases (stable training)."""
    weight = base.weight
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class SoraLayer(BaseTunerLayer):
    """Per-adapter SoRA state around `base_layer`: `sora_A[name]` (Linear in -> r), `sora_B[name]` (Linear r ->
    out), `sora_gate[name]` (r,), and the plain dicts `r`, `lora_alpha`, `scaling`."""

    adapter_layer_names = ("sora_A", "sora_B", "sora_gate")
    other_param_names = ("r", "lora_alpha", "scaling", "sora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.sora_dropout = nn.ModuleDict({})
        self.sora_A = nn.ModuleDict({})
        self.sora_B = nn.ModuleDict({})
        self.sora_gate = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.fan_in_fan_out = False
        self.in_features, self.out_features = _features(self.get_base_layer())

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, scaling: Optional[float] = None,
        gate_init: str = "ones", init_sora_weights: bool = True,
    ) -> None:
        """Add adapter `adapter_name` with `r` components; `scaling` defaults to `lora_alpha / r` (the model passes
        `lora_alpha / config.r`, so that a per-module rank from `rank_pattern` keeps the adapter's scale)."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"Invalid r={r!r}: expected a positive int.")
        if gate_init not in ("ones", "normal"):
            raise ValueError(f"Invalid gate_init={gate_init!r}: expected 'ones' or 'normal'.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = sora_scaling(lora_alpha, r) if scaling is None else scaling
        self.sora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        base = self.get_base_layer()
        kwargs = {"dtype": _adapter_dtype(base)}
        if torch.get_default_device().type != "meta" and base.weight.device.type != "meta":
            kwargs["device"] = base.weight.device  # else low_cpu_mem_usage: created on meta, loaded later
        self.sora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kwargs)
        self.sora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **kwargs)
        self.sora_gate[adapter_name] = nn.Parameter(torch.ones(r, **kwargs))
        self.reset_sora_parameters(adapter_name, gate_init, init_sora_weights)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_sora_parameters(self, adapter_name: str, gate_init: str, init_sora_weights: bool) -> None:
        """A Kaiming-uniform (a = sqrt(5)); B zero (random as A with `init_sora_weights=False`); gate all ones or
        N(0, 1)."""
        nn.init.kaiming_uniform_(self.sora_A[adapter_name].weight, a=math.sqrt(5))
        if init_sora_weights:
            nn.init.zeros_(self.sora_B[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.sora_B[adapter_name].weight, a=math.sqrt(5))
        gate = self.sora_gate[adapter_name]
        if gate_init == "normal":
            nn.init.normal_(gate)
        else:
            nn.init.ones_(gate)

    # --- merge --------------------------------------------------------------------------------------------------
    def _delta(self, adapter_name: str) -> torch.Tensor:
        """`s B diag(g) A` in at least fp32, shaped like the stored base weight."""
        return sora_delta_weight(self.sora_A[adapter_name].weight, self.sora_B[adapter_name].weight,
                                 self.sora_gate[adapter_name], self.scaling[adapter_name], self.fan_in_fan_out)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s B diag(g) A` shaped like the stored base weight, in the base weight's dtype."""
        return self._delta(adapter_name).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each named (default: active) adapter's update to the base weight, computed in at least fp32 and
        rounded once; with `safe_merge`, nothing changes if the result is not finite."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.sora_A and n not in self.merged_adapters]
        if not names:
            if self.merged:
                warnings.warn("All adapters are already merged, nothing to do.")
            return
        base = self.get_base_layer()
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        weight = base.weight.detach().to(dtype)
        for name in names:
            weight = weight + self._delta(name).to(dtype)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"Merging adapters {names} gives NaN/Inf in the base weight (NaNs detected in the merged "
                             "weights); nothing merged.")
        base.weight.data = weight.to(base.weight.dtype)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's update again (the inverse of `merge`), rounding once."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        weight = base.weight.detach().to(dtype)
        for name in reversed(self.merged_adapters):
            weight = weight - self._delta(name).to(dtype)
        base.weight.data = weight.to(base.weight.dtype)
        self.merged_adapters.clear()

    # --- gates --------------------------------------------------------------------------------------------------
    def live_rank(self, adapter_name: str) -> int:
        """How many gate entries of `adapter_name` are not exactly zero."""
        return int((self.sora_gate[adapter_name] != 0).sum())

    @torch.no_grad()
    def compact(self, adapter_name: str) -> int:
        """Drop the components of `adapter_name` whose gate is exactly zero (A rows, B columns, gate entries); the
        update `s B diag(g) A` is unchanged. Returns the new rank (at least 1; see `compact_factors`)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Invalid adapter_name={adapter_name!r}: it is merged; unmerge before compacting.")
        old_A, old_B = self.sora_A[adapter_name], self.sora_B[adapter_name]
        gate = self.sora_gate[adapter_name]
        A, B, g = compact_factors(old_A.weight.detach(), old_B.weight.detach(), gate.detach())
        rank = g.shape[0]
        new_A = nn.Linear(self.in_features, rank, bias=False, device=A.device, dtype=A.dtype)
        new_B = nn.Linear(rank, self.out_features, bias=False, device=B.device, dtype=B.dtype)
        new_A.weight.copy_(A)
        new_B.weight.copy_(B)
        for module, old in ((new_A, old_A), (new_B, old_B)):
            module.requires_grad_(old.weight.requires_grad)
        self.sora_A[adapter_name], self.sora_B[adapter_name] = new_A, new_B
        self.sora_gate[adapter_name] = nn.Parameter(g, requires_grad=gate.requires_grad)
        self.r[adapter_name] = rank
        return rank

    # --- forward ------------------------------------------------------------------------------------------------
    def _active_sora(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        return [n for n in self.active_adapters if n in self.sora_A]

    def _add_branches(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result + sum_a s_a B_a(g_a ⊙ A_a(dropout_a(x)))`, each branch in its adapter's dtype."""
        out_dtype = result.dtype
        for name in self._active_sora():
            sora_A, sora_B = self.sora_A[name], self.sora_B[name]
            h = self.sora_dropout[name](x.to(sora_A.weight.dtype))
            result = result + sora_B(sora_A(h) * self.sora_gate[name]) * self.scaling[name]
        return result.to(out_dtype)


class Linear(nn.Module, SoraLayer):
    """SoRA around `nn.Linear` (or GPT-2's Conv1D with `fan_in_fan_out=True`): `y = base(x) + s B (g ⊙ A x)`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, **kwargs) -> None:
        nn.Module.__init__(self)
        SoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        return self._add_branches(x, result)

    def __repr__(self) -> str:
        return "sora." + super().__repr__()
