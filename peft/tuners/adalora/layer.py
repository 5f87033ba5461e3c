"""AdaLoRA layers: the SVD-form update `delta W = B diag(E) A * s / (ranknum + 1e-5)` on Linear / Conv1D / Conv2d.

Per adapter (upstream's names, so state dicts move both ways): `lora_A[name]` (r x n, right singular vectors),
`lora_E[name]` (r x 1, singular values), `lora_B[name]` (m x r, left singular vectors), all `nn.ParameterDict`
entries; `ranknum[name]` (a frozen 1-element parameter, the rank the layer was created with, not saved) and the
plain dicts `r`, `lora_alpha`, `scaling` (= lora_alpha, or r when lora_alpha is 0), `lora_dropout`.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.layer import adapter_dtype
from ..tuner_layer import BaseTunerLayer

RANK_EPS = 1e-5  # upstream's guard in `s / (ranknum + eps)`


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def svd_delta(a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, scaling: float, ranknum: torch.Tensor) -> torch.Tensor:
    """`B diag(E) A * s / (ranknum + 1e-5)`: `a` (r, n), `e` (r, 1), `b` (m, r) -> (m, n)."""
    return b @ (a * e) * scaling / (ranknum + RANK_EPS)


class AdaLoraLayer(BaseTunerLayer):
    """Mixin of the AdaLoRA layers; subclasses say how the (m, n) update meets the base weight and the input."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def _init_adalora(self, base_layer: nn.Module, in_dim: int, out_dim: int) -> None:
        self.base_layer = base_layer
        self.in_features, self.out_features, self._factor_in = in_dim, out_dim, in_dim
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.merged_adapters = []
        self.fan_in_fan_out = False
        base_layer.weight.requires_grad_(False)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, ranknum: Optional[float] = None) -> None:
        """Create (or replace) adapter `adapter_name` at rank `r` (0 allowed). `ranknum` (default `r`) is the rank
        the scale divides by; a layer resized from a rank pattern keeps its initial rank there, as upstream does.
        init: True / "gaussian": E = 0, A and B ~ N(0, 0.02^2) (the output is unchanged); False: all ~ N(0, 1)."""
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"Invalid r={r!r} for adapter {adapter_name!r}: expected an int >= 0.")
        base = self.get_base_layer()
        dtype, device = adapter_dtype(base), base.weight.device
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        shapes = {"lora_A": (r, self._factor_in), "lora_E": (r, 1), "lora_B": (self.out_features, r)}
        for attr, shape in shapes.items():
            weight = torch.empty(shape, dtype=dtype)  # on meta inside BaseTuner's low_cpu_mem_usage context
            if init_lora_weights:
                nn.init.zeros_(weight) if attr == "lora_E" else nn.init.normal_(weight, mean=0.0, std=0.02)
            else:
                nn.init.normal_(weight)
            getattr(self, attr)[adapter_name] = nn.Parameter(weight if weight.is_meta else weight.to(device))
        # never on the meta device: ranknum is not in the adapter file, so low_cpu_mem_usage could not restore it
        rank_device = torch.device("cpu") if device.type == "meta" else device
        value = torch.full((1,), float(r if ranknum is None else ranknum), dtype=dtype, device=rank_device)
        self.ranknum[adapter_name] = nn.Parameter(value, requires_grad=False)
        self.set_adapter(self.active_adapters)
        self.ranknum[adapter_name].requires_grad_(False)

    # --- the update ---------------------------------------------------------------------------------------------
    def _delta_matrix(self, name: str) -> torch.Tensor:
        """The (m, n) update of adapter `name` in at least fp32."""
        a, e, b = (_at_least_fp32(getattr(self, k)[name]) for k in ("lora_A", "lora_E", "lora_B"))
        return svd_delta(a, e, b, self.scaling[name], _at_least_fp32(self.ranknum[name]))

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """The (m, n) update laid out like the stored base weight."""
        return delta.T if self.fan_in_fan_out else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`B diag(E) A * s / (ranknum + 1e-5)` shaped like the stored base weight, in its dtype."""
        delta = self._to_weight_layout(self._delta_matrix(adapter_name))
        return delta.to(self.get_base_layer().weight.dtype)

    # --- merge --------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the named (default: active) adapters' updates to the base weight, rounding once; with `safe_merge`
        nothing changes when the result is not finite."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            if self.merged:
                warnings.warn("All adapters are already merged, nothing to do.")
            return
        base = self.get_base_layer()
        weight = _at_least_fp32(base.weight.detach())
        for name in names:
            weight = weight + self._to_weight_layout(self._delta_matrix(name)).to(weight.dtype)
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
        weight = _at_least_fp32(base.weight.detach())
        for name in reversed(self.merged_adapters):
            weight = weight - self._to_weight_layout(self._delta_matrix(name)).to(weight.dtype)
        base.weight.data = weight.to(base.weight.dtype)
        self.merged_adapters.clear()

    # --- forward ------------------------------------------------------------------------------------------------
    def _branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _adalora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base output, plus each active adapter's branch unless the adapters are disabled or merged."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                x_cast = x.to(self.lora_A[name].dtype) if getattr(self, "cast_input_dtype_enabled", True) else x
                result = result + self._branch(self.lora_dropout[name](x_cast), name).to(result.dtype)
        return result



class SVDLinear(nn.Module, AdaLoraLayer):
    """AdaLoRA on `nn.Linear` or transformers' `Conv1D` (weight stored (in, out): `fan_in_fan_out`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, fan_in_fan_out: bool = False,
                 ranknum: Optional[float] = None, **kwargs) -> None:
        super().__init__()
        out_dim, in_dim = base_layer.weight.shape[::-1] if fan_in_fan_out else base_layer.weight.shape
        self._init_adalora(base_layer, int(in_dim), int(out_dim))
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, ranknum)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._adalora_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()

    def _branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        return (x @ (a * e).T @ b.T) * self.scaling[name] / (self.ranknum[name] + RANK_EPS)


class SVDConv2d(nn.Module, AdaLoraLayer):
    """AdaLoRA on `nn.Conv2d` (groups = 1): A is r x (in_channels * kh * kw), the update is reshaped to the kernel."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, ranknum: Optional[float] = None,
                 **kwargs) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"Invalid Conv2d with groups={base_layer.groups} for AdaLoRA: expected groups=1.")
        super().__init__()
        self._init_adalora(base_layer, base_layer.in_channels, base_layer.out_channels)
        self._factor_in = base_layer.weight[0].numel()  # in_channels * kh * kw
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, ranknum)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._adalora_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.get_base_layer().weight.shape)

    def _branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        # ranknum stays fp32 while the factors may be half (autocast_adapter_dtype=False): conv2d needs one dtype
        kernel = svd_delta(a, e, b, self.scaling[name], self.ranknum[name]).reshape(base.weight.shape).to(x.dtype)
        padding = base.padding if base.padding_mode == "zeros" else 0
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return F.conv2d(x, kernel, stride=base.stride, padding=padding, dilation=base.dilation)
