"""DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed LoRA, as pure tensor functions plus the magnitude.

A DoRA layer computes with the weight `W' = m / ||W + dW||_c * (W + dW)`, `dW = s B A`, where `||.||_c` is the
L2 norm of each output channel (row of the output-major weight: over the input features, and the kernel of a conv),
and `m` (one value per output channel, initialised to `||W + dW||_c`, so the layer starts equal to LoRA) is trained.
The norm is treated as a constant in the backward pass (paper, section 4.3).

Every function here takes weights in *output-major* layout: output channels along dim 0, `(out, in)` for a linear
layer, `(out, in / groups, *kernel)` for a conv. Layers that store W otherwise (GPT-2's Conv1D, `nn.Embedding`,
whose output channel is the embedding dim) transpose before calling. `channel_dim` says where the output channel
sits in a layer's *activations*: -1 for linear / embedding outputs `(..., out)`, 1 for conv outputs `(N, out, ...)`.

Forward without merging (`f = m / ||W + dW||_c`, `b` the base bias, `h = dropout(x)`):

    y = base(x) + (f - 1) * (W h) + f * s * B A h

which is `f * (W + dW) x + b` when there is no dropout (then `W h = base(x) - b` needs no extra matmul).
"""

from __future__ import annotations

import torch
from torch import nn

ENABLE_DORA_CACHING = False
"""Inference cache of `||W + dW||_c` per DoRA adapter (toggled by `peft.helpers.DoraCaching`); used only in eval."""


class DoraMagnitude(nn.Module):
    """Holds the trained magnitude `m` of one adapter as `.weight`: (out,), or (1, out, 1, ...) for a conv
    (upstream's shapes and in-memory layout `lora_magnitude_vector.<adapter>.weight`; on disk the key ends in
    `lora_magnitude_vector`). `_dora_cache` keeps the channel norm between eval forwards while
    `ENABLE_DORA_CACHING` is on; it is emptied by any other forward, by `train()`/`eval()` and by `.to(...)`."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)
        self._dora_cache: dict[str, torch.Tensor] = {}

    def cached(self, key: str, compute) -> torch.Tensor:
        """`compute()`, memoised under `key` only while caching is enabled and the module is in eval mode."""
        if not ENABLE_DORA_CACHING or self.training:
            self._dora_cache.clear()
            return compute()
        if key not in self._dora_cache:
            self._dora_cache[key] = compute()
        return self._dora_cache[key]

    def train(self, mode: bool = True) -> "DoraMagnitude":
        self._dora_cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._dora_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"out_channels={self.weight.numel()}"


def channel_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`||W + dW||_c`: (out, ...) -> (out,), the L2 norm over every dim but the first, in at least fp32."""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    combined = weight.to(dtype) + delta.to(device=weight.device, dtype=dtype)
    return torch.linalg.vector_norm(combined.flatten(1), dim=1)  # (out,)


def dense_group_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv kernel (c_out, c_in / g, *k) as the dense kernel it acts as, (c_out, c_in, *k): output
    channel `o` of group `j` holds its weights at input channels `j c_in/g ... (j + 1) c_in/g - 1`, zeros elsewhere.
    A grouped conv's LoRA update is dense (see `conv_math`), so DoRA's norm is taken on `dense(W) + dW`."""
    if groups == 1:
        return weight
    c_out, c_in_g = weight.shape[:2]
    dense = weight.new_zeros(c_out, c_in_g * groups, *weight.shape[2:])
    rows = c_out // groups
    for j in range(groups):
        dense[j * rows:(j + 1) * rows, j * c_in_g:(j + 1) * c_in_g] = weight[j * rows:(j + 1) * rows]
    return dense


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """`f = m / ||W + dW||_c` (out,): the per-channel factor that turns `W + dW` into DoRA's weight. `m` may be
    stored with singleton dims (a conv's is (1, out, 1, ...), upstream's shape)."""
    return magnitude.reshape(-1) / norm.to(magnitude.dtype)


def along_channels(vector: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """`vector` (C,) viewed to broadcast over a tensor of `ndim` dims whose channel axis is `channel_dim`."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return vector.reshape(shape)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor):
    """The merged weight `f * (W + dW)` (output-major), `f` from the given norm (that of the *unmerged* base)."""
    factor = dora_factor(magnitude, norm).to(weight.dtype)
    return along_channels(factor, weight.dim(), 0) * (weight + delta.to(weight.dtype))


def undo_dora_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor):
    """Inverse of `dora_weight`: `W = merged / f - dW` (output-major)."""
    factor = dora_factor(magnitude, norm).to(merged.dtype)
    return merged / along_channels(factor, merged.dim(), 0) - delta.to(merged.dtype)


def dora_output(
    result: torch.Tensor, base_no_bias: torch.Tensor, lora_out: torch.Tensor, factor: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """`result + (f - 1) * W h + f * (s B A h)`: `result` the base layer's output, `base_no_bias` = `W h` (the base
    without its bias, on the LoRA input `h`), `lora_out` = `s B A h`, `factor` = `m / norm` (out,), norm detached."""
    f = along_channels(factor, result.dim(), channel_dim).to(result.dtype)
    return result + (f - 1) * base_no_bias.to(result.dtype) + f * lora_out.to(result.dtype)


def base_weight_before_merges(weight: torch.Tensor, undo_steps) -> torch.Tensor:
    """The base weight with merged adapters taken out again, most recent first. `undo_steps` yields, per merged
    adapter in reverse merge order, `(delta, magnitude, norm)` for a DoRA adapter or `(delta, None, None)` for a
    plain one (output-major, fp32)."""
    for delta, magnitude, norm in undo_steps:
        weight = weight - delta if magnitude is None else undo_dora_weight(weight, delta, magnitude, norm)
    return weight


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


class DoraLayerMixin:
    """DoRA for `LoraLayer`: the magnitude's init and the forward branch, for any layer whose A and B are modules
    (Linear / Conv1D, Conv1d/2d/3d, bitsandbytes) or, for the init, the Embedding. Reads the layer's hooks
    `_base_weight_fp()` (float base weight as stored), `_output_major(t)` and `_delta_fp32(name)`."""

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """Upstream's keys (see `BaseTunerLayer`), with DoRA's magnitude saved as `lora_magnitude_vector` (no
        `.weight`)."""
        out = super().adapter_state_dict_load_map(adapter_name)
        if out.pop("lora_magnitude_vector.weight", None) is not None:
            out["lora_magnitude_vector"] = f"lora_magnitude_vector.{adapter_name}.weight"
        return out

    def _init_dora_magnitude(self, adapter_name: str) -> None:
        """`m = ||W + s B A||_c`: the DoRA layer starts equal to its LoRA layer."""
        base = self.get_base_layer()
        base_weight = self._dora_dense_weight()
        delta = self._output_major(self._delta_fp32(adapter_name))
        if base_weight.is_meta or delta.is_meta:  # low_cpu_mem_usage: filled when the adapter is loaded
            norm = torch.empty(base_weight.shape[0], dtype=delta.dtype, device="meta")
        else:
            with torch.no_grad():
                norm = channel_norm(base_weight, delta).to(delta.dtype)
        if _is_conv(base):  # upstream's shape for a conv: (1, out, 1, ...)
            norm = norm.reshape(1, -1, *([1] * (base.weight.dim() - 2)))
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)

    def _channel_dim(self) -> int:
        """Where the output channel sits in this layer's output: 1 for a conv (N, C, ...), else the last dim."""
        return 1 if _is_conv(self.get_base_layer()) else -1

    def _weight_only_forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's map with `weight` (output-major) and no bias."""
        base = self.get_base_layer()
        if _is_conv(base):
            return base._conv_forward(h, weight.to(h.dtype), None)
        return torch.nn.functional.linear(h, weight.to(h.dtype))

    def _dora_norm(self, adapter_name: str) -> torch.Tensor:
        """`||W + s B A||_c` (out,), no gradient (DoRA section 4.3)."""
        def compute() -> torch.Tensor:
            with torch.no_grad():
                return channel_norm(self._dora_dense_weight(), self._output_major(self._delta_fp32(adapter_name)))

        magnitude = self.lora_magnitude_vector[adapter_name]
        return magnitude.cached("weight-norm", compute) if isinstance(magnitude, DoraMagnitude) else compute()

    def _dora_dense_weight(self) -> torch.Tensor:
        """The float base weight, output-major; a grouped conv's as the dense kernel it acts as."""
        weight = self._output_major(self._base_weight_fp())
        return dense_group_kernel(weight, getattr(self.get_base_layer(), "groups", 1)) if not weight.is_meta else weight

    def _dora_branch(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result + (f - 1) W h + f s B A h`, `f = m / ||W + s B A||_c`, `h = dropout(x)`. Without dropout (or in
        eval) `W h` is `result` less the base bias; with it, `W h` is computed again."""
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        factor = dora_factor(self.lora_magnitude_vector[adapter_name].weight, self._dora_norm(adapter_name))
        h = self._cast_input(x, lora_A.weight.dtype) if hasattr(self, "_cast_input") else x.to(lora_A.weight.dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_no_bias = self._without_base_bias(result)
        else:
            h = dropout(h)
            with torch.no_grad():
                weight = self._output_major(self._base_weight_fp())
            base_no_bias = self._weight_only_forward(h, weight)
        lora_out = lora_B(lora_A(h)) * self.scaling[adapter_name]
        return dora_output(result, base_no_bias, lora_out, factor, self._channel_dim())

    def _without_base_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.get_base_layer(), "bias", None)
        if bias is None:
            return result
        return result - along_channels(bias.to(result.dtype), result.dim(), self._channel_dim())
