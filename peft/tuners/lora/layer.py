"""LoRA layers: `LoraLayer` (shared per-adapter state, merge, unmerge) and the `nn.Linear` / Conv1D layer."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional, Union

import torch
from torch import nn

from ...utils.memory import available_memory_bytes
from ...utils.warning import PeftWarning
from ..tuners_utils import BaseTunerLayer
from .dora import DoraLayerMixin, base_weight_before_merges, channel_norm, dora_weight
from .functional import delta_weight, lora_scaling
from .init_methods import initialise_from_weight, is_weight_init
from .mixed_batch import mixed_forward


def base_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    kind = type(base_layer).__name__
    if isinstance(base_layer, nn.Embedding):
        return base_layer.num_embeddings, base_layer.embedding_dim
    if isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return base_layer.in_channels, base_layer.out_channels
    if isinstance(base_layer, nn.MultiheadAttention):  # LoRA on in_proj: (embed, 3 * embed) as in upstream PEFT
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                "Only same embed for query/key/value is supported as of now for MultiheadAttention: LoRA on it needs "
                f"kdim == vdim == embed_dim (one in_proj_weight), got "
                f"embed_dim={base_layer.embed_dim}, kdim={base_layer.kdim}, vdim={base_layer.vdim}."
            )
        return base_layer.embed_dim, 3 * base_layer.embed_dim
    if kind == "Conv1D":
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    if isinstance(base_layer, nn.Linear):  # bitsandbytes' layers too
        return base_layer.in_features, base_layer.out_features
    # a user's own module type, adapted by a layer class registered with LoraConfig._register_custom_module
    warnings.warn(f"Unsupported layer type '{type(base_layer)}' encountered, proceed at your own risk.", UserWarning)
    return getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None)


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


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


class LoraLayer(DoraLayerMixin, BaseTunerLayer):
    """Per-adapter LoRA state around `base_layer`: `lora_A[name]` (r x in), `lora_B[name]` (out x r), `scaling`."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora", "use_dora", "lora_bias")
    supports_lora_bias = True  # a trainable bias on B (`lora_bias=True`); Embedding has none

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
        self.lora_magnitude_vector = nn.ModuleDict({})  # DoRA: `DoraMagnitude` per adapter (see .dora)
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._dora_merge_norms: dict[str, torch.Tensor] = {}  # ||W + dW||_c of each merged DoRA adapter
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.fan_in_fan_out = False
        self.in_features, self.out_features = self._read_features()
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
    def _read_features(self) -> tuple[int, int]:
        """(in_features, out_features) of the update; `ParamWrapper` reads them from the targeted parameter."""
        return base_features(self.get_base_layer())

    def _make_factors(self, adapter_name: str, r: int) -> None:
        """Create this layer type's A and B for `adapter_name` (subclasses override)."""
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Add adapter `adapter_name` of rank `r` to this layer (DoRA with `use_dora`, a bias on B with
        `lora_bias`)."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}.")
        if lora_bias and not self.supports_lora_bias:
            raise ValueError(f"lora_bias={lora_bias} is not supported for {type(self).__name__}.")
        if lora_bias and use_dora:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False.")
        if lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                "has no bias. This means that merging LoRA weights won't be possible.",
                PeftWarning,
            )
        self._check_factor_size(adapter_name, r)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.use_dora[adapter_name] = bool(use_dora)
        self.lora_bias[adapter_name] = bool(lora_bias)
        self._make_factors(adapter_name, r)
        if lora_bias:
            self._add_lora_B_bias(adapter_name)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_base(adapter_name)
        if use_dora:
            self._init_dora_magnitude(adapter_name)
        self.set_adapter(self.active_adapters)

    def _add_lora_B_bias(self, adapter_name: str) -> None:
        """Give B (an `nn.Linear` or conv) a bias of `out_features` values, drawn like torch's default bias init
        (`U(-1/sqrt(r), 1/sqrt(r))`); `reset_lora_parameters` zeroes it unless `init_lora_weights=False`."""
        lora_B = self.lora_B[adapter_name]
        bound = 1 / math.sqrt(self.r[adapter_name])
        bias = torch.empty(self.out_features, dtype=lora_B.weight.dtype, device=lora_B.weight.device)
        lora_B.bias = nn.Parameter(bias.uniform_(-bound, bound))

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
        if is_weight_init(init_lora_weights):  # PiSSA, OLoRA, orthogonal, ...: from the base weight
            return initialise_from_weight(self, adapter_name, init_lora_weights)
        weight_A, weight_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(weight_A, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(weight_A, a=math.sqrt(5))
        nn.init.zeros_(weight_B)
        if getattr(self.lora_B[adapter_name], "bias", None) is not None:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

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
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            on_meta = any(p.is_meta for p in params)  # low_cpu_mem_usage: created on meta, stays there until loaded
            to = {"dtype": dtype} if on_meta else {"device": device, "dtype": dtype}
            if isinstance(item, nn.Parameter):
                container[adapter_name] = nn.Parameter(item.data.to(**to))
            else:
                item.to(**to)

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
        elif self.merged:
            warnings.warn("All adapters are already merged, nothing to do.")
        return names

    # Subclasses whose weight is not a plain float tensor (bitsandbytes) override these three.
    _merge_checks_finite = False  # check the merged weight even without safe_merge

    def _base_weight_fp(self) -> torch.Tensor:
        """A float copy (at least fp32) of the base weight as stored, including merged adapters."""
        return _at_least_fp32(self.get_base_layer().weight.detach())

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        base.weight.data = weight.to(base.weight.dtype)
        for magnitude in self.lora_magnitude_vector.values():  # a cached DoRA norm is stale once W changes
            getattr(magnitude, "_dora_cache", {}).clear()

    def _output_major(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor in output-major layout (out channels first) and back: an involution."""
        return weight.T if self.fan_in_fan_out else weight

    def _bias_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        """`s * b_B` (out,) in fp32 for an adapter with `lora_bias`, else None."""
        if not self.lora_bias.get(adapter_name, False):
            return None
        return _at_least_fp32(self.lora_B[adapter_name].bias.detach()) * self.scaling[adapter_name]

    def _merge_steps(self, names: list[str], new_norms: Optional[dict] = None) -> list[tuple]:
        """(delta, magnitude, norm) per merged adapter in `names` order, output-major fp32, the norm the adapter
        was merged with (`new_norms` first, then the stored ones); see `dora.base_weight_before_merges`."""
        steps = []
        for name in names:
            delta = self._output_major(self._delta_fp32(name))
            magnitude = self.lora_magnitude_vector[name].weight.detach() if self.use_dora.get(name) else None
            norm = (new_norms or {}).get(name, self._dora_merge_norms.get(name))
            steps.append((delta, magnitude, norm))
        return steps

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge each named (default: active) adapter into the base weight, rounding once: LoRA adds `s B A`, DoRA
        replaces `W` by `m / ||W0 + s B A||_c * (W + s B A)` (`W0`: the base without merged adapters), `lora_bias`
        adds `s b_B` to the base bias. Nothing changes when a check fails."""
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        base = self.get_base_layer()
        if any(self.lora_bias.get(n) for n in names) and getattr(base, "bias", None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        weight = self._output_major(self._base_weight_fp())
        bias = None if getattr(base, "bias", None) is None else _at_least_fp32(base.bias.detach())
        merged, norms = list(self.merged_adapters), {}
        for name in names:
            delta = self._output_major(self._delta_fp32(name))
            if self.use_dora.get(name):
                unmerged = base_weight_before_merges(weight, self._merge_steps(merged[::-1], norms))
                norms[name] = channel_norm(unmerged, delta)
                weight = dora_weight(weight, delta, self.lora_magnitude_vector[name].weight.detach(), norms[name])
            else:
                weight = weight + delta.to(weight.dtype)
            bias_delta = self._bias_delta(name)
            if bias_delta is not None:
                bias = bias + bias_delta
            merged.append(name)
        if (safe_merge or self._merge_checks_finite) and not (
            torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
        ):
            raise ValueError(f"Merging adapters {names} gives NaN/Inf in the base weight (NaNs detected in the merged "
                             "weights); nothing merged.")
        self._write_base_weight(self._output_major(weight))
        if bias is not None and any(self.lora_bias.get(n) for n in names):
            base.bias.data = bias.to(base.bias.dtype)
        self._dora_merge_norms.update(norms)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take every merged adapter out again, most recent first (the inverse of `merge`), rounding once."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        names = list(reversed(self.merged_adapters))
        weight = self._output_major(self._base_weight_fp())
        steps = self._merge_steps(names)
        weight = base_weight_before_merges(weight, steps)
        bias_deltas = [d for d in (self._bias_delta(n) for n in names) if d is not None]
        self._write_base_weight(self._output_major(weight))
        if bias_deltas:
            base.bias.data = (_at_least_fp32(base.bias.detach()) - sum(bias_deltas)).to(base.bias.dtype)
        for name in names:
            self._dora_merge_norms.pop(name, None)
        self.merged_adapters.clear()

    # --- forward helpers ----------------------------------------------------------------------------------------
    def _base_forward(self, x, *args, **kwargs):
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)

    def _lora_active(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        return [n for n in self.active_adapters if n in self.lora_A or n in self.lora_embedding_A]

    def _cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` in the adapter's dtype, unless `peft.helpers.disable_input_dtype_casting` switched casting off."""
        return x.to(dtype) if getattr(self, "cast_input_dtype_enabled", True) else x

    def _add_lora_branches(self, x: torch.Tensor, result: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """`result + sum_a s_a B_a(A_a(dropout_a(x)))` over the active adapters (DoRA adapters through
        `_dora_branch`), each branch computed in its adapter's dtype; the sum is cast to `out_dtype`. For layers
        whose A and B are modules (Linear, Conv)."""
        names = self._lora_active()
        if not names:
            return result
        for name in names:
            if self.use_dora.get(name):
                result = self._dora_branch(name, x, result)
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](self._cast_input(x, lora_A.weight.dtype))
            result = result + lora_B(lora_A(h)) * self.scaling[name]
        return result.to(out_dtype)


class Linear(nn.Module, LoraLayer):
    """LoRA around `nn.Linear` (or GPT-2's Conv1D with `fan_in_fan_out=True`): `y = base(x) + s B A dropout(x)`."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, fan_in_fan_out: bool = False, init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False, use_dora: bool = False, lora_bias: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          use_dora=use_dora, lora_bias=lora_bias)

    supports_mixed_batch = True  # `adapter_names=[...]`: one adapter per sample (see .mixed_batch)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if "adapter_names" in kwargs:
            return mixed_forward(self, x, kwargs.pop("adapter_names"), *args, **kwargs)
        result = self._base_forward(x, *args, **kwargs)
        return self._add_lora_branches(x, result, result.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def __getattr__(name: str):
    """The other layer classes live in their own modules (which import this one); upstream imports them from here."""
    if name in ("Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention"):
        from . import conv, embedding, mha

        return getattr({"Embedding": embedding, "MultiheadAttention": mha}.get(name, conv), name)
    if name == "ParamWrapper":
        from .param_wrapper import ParamWrapper

        return ParamWrapper
    if name in ("_LoraFactorsProxy", "_LoraParameterProxy"):  # upstream's parametrization names (its tests patch them)
        from .param_wrapper import _AddDelta

        return _AddDelta
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
