"""LoRA-Pro layers: LoRA layers (Linear / Conv1D, Embedding, Conv2d, and any backend's) that also carry the
gradient adjustment. Each one turns its own `(A, B, dL/dA, dL/dB, s)` into the adjusted gradients, reading `s`
(rsLoRA included) and its LoRA-Pro options from itself.

A LoRA-Pro layer is the LoRA layer built by the LoRA dispatchers, given the `LoraProLayer` mixin (its class becomes
a subclass that adds methods only, no state besides `lorapro_options`). Matrices: `A` is (r, n) and `B` is (m, r)
with W's update `s B A` (m, n); a Conv2d A (r, c_in, kh, kw) is used as (r, c_in kh kw), its B (c_out, r, 1, 1) as
(c_out, r); an Embedding's `lora_embedding_A` / `lora_embedding_B` already are (r, n) / (m, r).

The functions `lora_factors`, `lora_matrices`, `lora_adapter_names`, `lora_dropout_p` and `check_lorapro_rank` read
the same things from any `LoraLayer` (a plain `LoraConfig` model too): the optimizers train those with LoRA-Pro,
their options then coming from the optimizer's arguments.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..lora import Conv2d as LoraConv2d
from ..lora import Embedding as LoraEmbedding
from ..lora import Linear as LoraLinear
from ..lora.layer import LoraLayer
from . import math as lp
from .config import validate_options

# Every live LoRA-Pro layer (weak: a layer that is garbage collected drops out). Lets `AdamWLoRAPro`, which only
# receives parameters, find the layer that owns each one.
_LIVE_LAYERS: "weakref.WeakSet[LoraProLayer]" = weakref.WeakSet()


@dataclass(frozen=True)
class LoraProOptions:
    """Per-adapter LoRA-Pro options of a layer (from `LoraProConfig`). The defaults are `LoraProConfig`'s: a plain
    LoRA layer trained by a LoRA-Pro optimizer uses them unless the optimizer is given others."""

    mode: str = "full"
    x_mode: str = "sylvester"
    damping: float = 1e-8

    def __post_init__(self) -> None:
        validate_options(self.mode, self.x_mode, self.damping)


def lora_adapter_names(layer: LoraLayer) -> list[str]:
    """The adapters that have factors on `layer` (Linear / Conv2d ones first, then Embedding ones)."""
    return [*layer.lora_A.keys(), *layer.lora_embedding_A.keys()]


def lora_factors(layer: LoraLayer, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The parameters (A, B) of `adapter_name` on any LoRA layer, as stored (Conv2d: 4-d)."""
    if adapter_name in layer.lora_A:
        return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if adapter_name in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    raise KeyError(f"Layer {type(layer).__name__} has no adapter {adapter_name!r}.")


def lora_matrices(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, n), B (m, r)) views of the factors of `adapter_name` on any LoRA layer."""
    A, B = lora_factors(layer, adapter_name)
    return A.detach().flatten(1), B.detach().flatten(1)


def lora_dropout_p(layer: LoraLayer, adapter_name: str) -> float:
    """The dropout probability applied to the input of `adapter_name`'s A (0 for Embedding LoRA, which has none)."""
    if adapter_name not in layer.lora_A or adapter_name not in layer.lora_dropout:
        return 0.0
    return float(getattr(layer.lora_dropout[adapter_name], "p", 0.0))


def check_lorapro_rank(layer: LoraLayer, adapter_name: str, key: str = "") -> None:
    """Raise ValueError when r exceeds a dimension of the update (A could not have full row rank)."""
    A, B = lora_matrices(layer, adapter_name)
    (r, n), m = A.shape, B.shape[0]
    if r > min(m, n):
        raise ValueError(
            f"LoRA-Pro needs r <= min(out, in) of every adapted layer; {key or type(layer).__name__} has r={r}, "
            f"update shape ({m}, {n}). Lower r (or use rank_pattern for this module)."
        )


def lora_adjusted_gradients(
    layer: LoraLayer, adapter_name: str, grad_A: torch.Tensor, grad_B: torch.Tensor, x_mode: str = "sylvester",
    damping: float = 1e-8, grams: lp.Grams | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's `(gA', gB')` (paper eq. 8) for `adapter_name` of any LoRA layer, with s read from the layer,
    shaped like the factors, in fp32 (fp64 for fp64 inputs)."""
    A, B = lora_matrices(layer, adapter_name)
    new_gA, new_gB = lp.adjusted_gradients(A, B, grad_A.flatten(1), grad_B.flatten(1),
                                           float(layer.scaling[adapter_name]), x_mode, damping, grams)
    return new_gA.reshape(grad_A.shape), new_gB.reshape(grad_B.shape)


class LoraProLayer:
    """Mixin for a `LoraLayer`: the factors of an adapter as matrices, and their LoRA-Pro adjusted gradients."""

    lorapro_options: dict[str, LoraProOptions]

    def lorapro_factors(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The parameters (A, B) of `adapter_name`, as stored (Conv2d: 4-d)."""
        return lora_factors(self, adapter_name)

    def lorapro_matrices(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, n), B (m, r)) views of the factors of `adapter_name`."""
        return lora_matrices(self, adapter_name)

    def lorapro_scaling(self, adapter_name: str) -> float:
        """s of `adapter_name`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
        return float(self.scaling[adapter_name])

    def lorapro_adjusted_gradients(
        self, adapter_name: str, grad_A: torch.Tensor, grad_B: torch.Tensor,
        x_mode: str | None = None, damping: float | None = None, grams: lp.Grams | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA-Pro's `(gA', gB')` (paper eq. 8) for this layer's adapter, shaped like the factors, in fp32 (fp64 for
        fp64 inputs). `x_mode` / `damping` default to the adapter's options; `grams`: the Grams of this adapter's
        (A, B) with that damping, when already decomposed (`lp.grams_batched`, one call for many layers)."""
        opts = self.lorapro_options[adapter_name]
        return lora_adjusted_gradients(self, adapter_name, grad_A, grad_B, opts.x_mode if x_mode is None else x_mode,
                                       opts.damping if damping is None else damping, grams)

    def __setstate__(self, state) -> None:  # copies and unpickled layers are live layers too
        super().__setstate__(state)
        _LIVE_LAYERS.add(self)


class Linear(LoraProLayer, LoraLinear):
    """LoRA-Pro layer around `nn.Linear` / GPT-2's Conv1D."""


class Embedding(LoraProLayer, LoraEmbedding):
    """LoRA-Pro layer around `nn.Embedding`."""


class Conv2d(LoraProLayer, LoraConv2d):
    """LoRA-Pro layer around `nn.Conv2d` (A used as (r, c_in kh kw))."""


_PRO_CLASSES: dict[type, type] = {LoraLinear: Linear, LoraEmbedding: Embedding, LoraConv2d: Conv2d}


def lorapro_class(lora_cls: type) -> type:
    """The LoRA-Pro subclass of a LoRA layer class (made once for backend classes such as bitsandbytes')."""
    if issubclass(lora_cls, LoraProLayer):
        return lora_cls
    if lora_cls not in _PRO_CLASSES:
        _PRO_CLASSES[lora_cls] = type(f"LoraPro{lora_cls.__name__}", (LoraProLayer, lora_cls), {
            "__module__": lora_cls.__module__, "__doc__": f"LoRA-Pro layer of {lora_cls.__qualname__}."})
    return _PRO_CLASSES[lora_cls]


def make_lorapro_layer(layer: LoraLayer, adapter_name: str, options: LoraProOptions, key: str = "") -> LoraProLayer:
    """Give `layer` (a LoRA layer just created or updated for `adapter_name`) the LoRA-Pro methods and options.

    Raises ValueError when r exceeds a dimension of the update (A could not have full row rank)."""
    if not isinstance(layer, LoraLayer):
        raise ValueError(f"{key or type(layer).__name__} is a {type(layer).__name__}, not a LoRA layer.")
    if not isinstance(layer, LoraProLayer):
        layer.__class__ = lorapro_class(type(layer))
        layer.lorapro_options = {}
    check_lorapro_rank(layer, adapter_name, key)
    layer.lorapro_options[adapter_name] = options
    _LIVE_LAYERS.add(layer)
    return layer


def live_lorapro_layers() -> list[LoraProLayer]:
    """Every LoRA-Pro layer alive in this process."""
    return list(_LIVE_LAYERS)
