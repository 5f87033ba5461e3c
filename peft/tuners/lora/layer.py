"""LoRA layers: `LoraLayer` (shared per-adapter state, merge, unmerge) and the `nn.Linear` / Conv1D layer."""

from __future__ import annotations

import math
import os
import warnings
import weakref
from typing import Optional, Union

import torch
from torch import nn

from ..tuners_utils import BaseTunerLayer
from .functional import add_to_weight, delta_weight, lora_scaling


def base_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    kind = type(base_layer).__name__
    if isinstance(base_layer, nn.Embedding):
        return base_layer.num_embeddings, base_layer.embedding_dim
    if isinstance(base_layer, nn.Conv2d):
        return base_layer.in_channels, base_layer.out_channels
    if kind == "Conv1D":
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
        return base_layer.in_features, base_layer.out_features
    raise ValueError(f"Cannot read the in/out features of a {kind}; expected a Linear, Conv1D, Embedding or Conv2d.")


def available_memory_bytes() -> Optional[int]:
    """Host memory a new allocation can still get: MemAvailable + SwapFree (Linux), else the physical total, else
    None (unknown: no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.rstrip().endswith("kB")}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """fp32 for fp16/bf16/quantized bases (stable training), the base dtype for fp32/fp64 bases."""
    weight = getattr(base_layer, "weight", None)
    if weight is None or weight.dtype in (torch.float32, torch.float64):
        return torch.float32 if weight is None else weight.dtype
    return torch.float32


# Every live LoRA layer (weak: a collected layer drops out). Lets an optimizer that only receives parameters (the
# param groups transformers' Trainer passes) find the layer that owns each factor: `live_lora_layers()`.
_LIVE_LAYERS: "weakref.WeakSet[LoraLayer]" = weakref.WeakSet()


def live_lora_layers() -> list["LoraLayer"]:
    return list(_LIVE_LAYERS)


class LoraLayer(BaseTunerLayer):
    """Per-adapter LoRA state around `base_layer`: `lora_A[name]` (r x in), `lora_B[name]` (out x r), `scaling`."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_features(self.get_base_layer())
        _LIVE_LAYERS.add(self)

    def __init_subclass__(cls, **kwargs) -> None:
        """Deep copies and unpickled layers are live layers too. The concrete classes put `nn.Module` first in
        their bases, so its `__setstate__` would win over one defined here: wrap each class's own instead."""
        super().__init_subclass__(**kwargs)
        inherited = cls.__setstate__
        if getattr(inherited, "registers_lora_layer", False):
            return

        def __setstate__(self, state) -> None:
            inherited(self, state)
            _LIVE_LAYERS.add(self)

        __setstate__.registers_lora_layer = True
        cls.__setstate__ = __setstate__

    # --- creation -----------------------------------------------------------------------------------------------
    def _make_factors(self, adapter_name: str, r: int) -> None:
        """Create this layer type's A and B for `adapter_name` (subclasses override)."""
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
    ) -> None:
        """Add adapter `adapter_name` of rank `r` to this layer."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}.")
        self._check_factor_size(adapter_name, r)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._make_factors(adapter_name, r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters)

    def _check_factor_size(self, adapter_name: str, r: int) -> None:
        """Refuse, before allocating, a rank whose A and B (`r * (in * kernel + out)` values, created on the host
        first) exceed the memory the host can still give: the allocator would fail with a message naming neither
        r nor the layer, or overcommit and get the process killed when the init writes every value. Any real rank
        passes (upstream allows r > min(in, out); the adapter of one layer larger than all free memory never fits)."""
        base = self.get_base_layer()
        kernel = math.prod(getattr(base, "kernel_size", None) or (1,))
        itemsize = adapter_dtype(base).itemsize
        nbytes = r * (self.in_features * kernel + self.out_features) * itemsize
        limit = available_memory_bytes()
        if limit is not None and nbytes > limit:
            raise ValueError(
                f"Invalid r={r} for adapter {adapter_name!r} on {base}: its A and B would take {nbytes:,} bytes "
                f"(r * (in_features * kernel + out_features) * {itemsize}), more than the {limit:,} bytes of memory "
                "available; lower r (or set a smaller rank for this module in rank_pattern)."
            )

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        """True: A Kaiming-uniform (a = sqrt(5)), B zero; "gaussian": A ~ N(0, 1/r^2), B zero; False: as created."""
        if init_lora_weights is False or adapter_name not in self.lora_A:
            return
        weight_A, weight_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(weight_A, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(weight_A, a=math.sqrt(5))
        nn.init.zeros_(weight_B)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        device = weight.device if weight is not None and weight.device.type != "meta" else None
        dtype = adapter_dtype(base)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                container[adapter_name] = nn.Parameter(item.data.to(device=device, dtype=dtype))
            else:
                item.to(device=device, dtype=dtype)

    # --- merge --------------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s * B @ A` shaped like the stored base weight, in the base weight's dtype."""
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = delta_weight(A, B, self.scaling[adapter_name], self.fan_in_fan_out)
        return delta.to(self.get_base_layer().weight.dtype)

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return delta_weight(A, B, self.scaling[adapter_name], self.fan_in_fan_out)

    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self._all_available_adapter_names() and n not in self.merged_adapters]
        if self.merged and names:
            warnings.warn(f"Already merged {self.merged_adapters}; now also merging {names}.")
        return names

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add `s B A` of each named (default: active) adapter to the base weight, rounding once per adapter."""
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            new_weight = add_to_weight(base.weight.data, self._delta_fp32(name), sign=1)
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(f"Merging adapter {name!r} would put NaN/Inf into the base weight; nothing merged.")
            base.weight.data = new_weight
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again, in reverse order."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data = add_to_weight(base.weight.data, self._delta_fp32(name), sign=-1)

    # --- forward helpers ----------------------------------------------------------------------------------------
    def _base_forward(self, x, *args, **kwargs):
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)

    def _lora_active(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        return [n for n in self.active_adapters if n in self.lora_A or n in self.lora_embedding_A]

    def _add_lora_branches(self, x: torch.Tensor, result: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """`result + sum_a s_a B_a(A_a(dropout_a(x)))` over the active adapters, each branch computed in its
        adapter's dtype; the sum is cast to `out_dtype`. For layers whose A and B are modules (Linear, Conv)."""
        names = self._lora_active()
        if not names:
            return result
        for name in names:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(lora_A.weight.dtype))
            result = result + lora_B(lora_A(h)) * self.scaling[name]
        return result.to(out_dtype)


class Linear(nn.Module, LoraLayer):
    """LoRA around `nn.Linear` (or GPT-2's Conv1D with `fan_in_fan_out=True`): `y = base(x) + s B A dropout(x)`."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, fan_in_fan_out: bool = False, init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base_forward(x, *args, **kwargs)
        return self._add_lora_branches(x, result, result.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
