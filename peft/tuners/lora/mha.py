"""LoRA around `nn.MultiheadAttention` (one `in_proj_weight`: kdim == vdim == embed_dim), as in upstream PEFT:
one adapter on the packed q/k/v projection and one on the output projection.

- in_proj: this layer's `lora_A` (r, E) and `lora_B` (3E, r): `W_in' = W_in + s B A` (3E, E).
- out_proj: the base's `out_proj` is wrapped in a LoRA `Linear` (its keys: `<mha>.base_layer.out_proj.lora_A...`),
  `W_out' = W_out + 2 s B_o A_o`. The 2 is upstream PEFT 0.21.2's convention, not a choice: its forward, merge and
  `merge_and_unload` all add the output projection's update twice (measured against the real package), so an
  adapter file gives the same outputs in both packages only if this layer counts it twice as well.

`nn.MultiheadAttention` reads `in_proj_weight` and `out_proj.weight` directly and never calls `out_proj`, so a LoRA
branch cannot be added to an output. The forward instead runs the base attention with the two updated weights in
place of the stored ones for the duration of the call (`_shadowed`: an instance attribute in front of the
registered parameter, as FSDP does with its views; the parameters themselves never change and gradients reach A
and B).
The result equals the merged layer's. As upstream, `lora_dropout` has no effect here (there is no `x` to drop out
for a weight update).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Union

import torch
from torch import nn

from .layer import Linear, LoraLayer

# Attributes of the base attention that code around it reads from the layer in its place (e.g.
# `nn.TransformerEncoderLayer` reads `self_attn.batch_first`).
_FORWARDED = (
    "embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim",
    "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "merge_masks",
)


@contextmanager
def _shadowed(swaps: list[tuple[nn.Module, str, torch.Tensor]]):
    """Within the block, `module.name` reads `tensor` for each `(module, name, tensor)`: an entry in the instance
    `__dict__` is found before `nn.Module.__getattr__` looks at `_parameters`. Whatever the instance dict held
    before (FSDP keeps its parameter views there) is put back afterwards, also on error."""
    missing = object()
    saved = [(module, name, module.__dict__.get(name, missing)) for module, name, _ in swaps]
    try:
        for module, name, tensor in swaps:
            module.__dict__[name] = tensor
        yield
    finally:
        for module, name, old in reversed(saved):
            if old is missing:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = old


# How many times upstream PEFT 0.21.2 adds the output projection's `s B_o A_o` (see the module docstring).
OUT_PROJ_UPDATE_COUNT = 2


class OutProjLinear(Linear):
    """The LoRA `Linear` on `MultiheadAttention.out_proj`: its update counts `OUT_PROJ_UPDATE_COUNT` times."""

    update_count = OUT_PROJ_UPDATE_COUNT

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        return super()._delta_fp32(adapter_name) * self.update_count

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._delta_fp32(adapter_name).to(self.get_base_layer().weight.dtype)


class MultiheadAttention(nn.Module, LoraLayer):
    """LoRA on the q/k/v projection (this layer) and on the output projection (a nested LoRA `Linear`)."""

    supports_lora_bias = False
    # The output projection's factors are listed here too (read-only views of its containers), so that code that
    # visits the outermost tuner layers only (dtype casts, materialising `low_cpu_mem_usage` weights, freezing)
    # reaches them; the nested layer stays a tuner layer of its own for everything else.
    adapter_layer_names = LoraLayer.adapter_layer_names + ("out_proj_lora_A", "out_proj_lora_B")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        if kwargs.get("use_dora"):
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False.")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise ValueError(f"LoRA on nn.MultiheadAttention needs an nn.Linear out_proj, got {base_layer.out_proj}.")
        LoraLayer.__init__(self, base_layer)  # checks kdim == vdim == embed_dim
        self._active_adapter = adapter_name
        settings = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                        use_rslora=use_rslora)
        LoraLayer.update_layer(self, adapter_name, **settings)
        base_layer.out_proj = OutProjLinear(base_layer.out_proj, adapter_name, **settings)

    def __getattr__(self, name: str):
        if name in _FORWARDED:
            return getattr(self.get_base_layer(), name)
        return super().__getattr__(name)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """The base's flag, but False while an unmerged adapter is active: `nn.TransformerEncoderLayer`'s inference
        fast path reads `in_proj_weight` / `out_proj.weight` itself and would skip the adapter; this flag is one of
        its conditions, so the encoder layer calls this layer's forward instead."""
        return self.get_base_layer()._qkv_same_embed_dim and not self._adapter_in_forward()

    def _adapter_in_forward(self) -> bool:
        if self.disable_adapters:  # the forward then runs the plain base (as upstream), out_proj's adapter included
            return False
        return bool(self._lora_active()) or any(out._lora_active() for out in self._out_layers())

    @property
    def out_proj(self) -> nn.Module:
        """The base output projection (as upstream: the plain `nn.Linear`, not its LoRA wrapper)."""
        return self._out_lora().get_base_layer()

    @property
    def out_proj_lora_A(self) -> nn.ModuleDict:
        return self._out_layers()[0].lora_A if self._out_layers() else nn.ModuleDict()

    @property
    def out_proj_lora_B(self) -> nn.ModuleDict:
        return self._out_layers()[0].lora_B if self._out_layers() else nn.ModuleDict()

    def _out_lora(self) -> nn.Module:
        return self.get_base_layer().out_proj

    def _out_layers(self) -> list[LoraLayer]:
        out = self._out_lora()
        return [out] if isinstance(out, LoraLayer) else []

    # --- adapters: the output projection's LoRA follows this layer ------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, *args, **kwargs) -> None:
        if kwargs.get("use_dora"):
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False.")
        super().update_layer(adapter_name, r, *args, **kwargs)
        for out in self._out_layers():
            out.update_layer(adapter_name, r, *args, **kwargs)

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        super().set_adapter(adapter_names)
        for out in self._out_layers():
            out.set_adapter(adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for out in self._out_layers():
            out.delete_adapter(adapter_name)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        """Like `LoraLayer`'s, reading device and dtype from `in_proj_weight` (the attention has no `weight`);
        factors created on meta (`low_cpu_mem_usage`) stay there until loaded."""
        weight = self.get_base_layer().in_proj_weight
        device = None if weight.is_meta else weight.device
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for container in (self.lora_A, self.lora_B):
            if adapter_name in container:
                factor = container[adapter_name]
                on_meta = any(p.is_meta for p in factor.parameters())
                factor.to(dtype=dtype) if on_meta else factor.to(device=device, dtype=dtype)

    # --- merge: LoraLayer's, on in_proj_weight, then the output projection's -------------------------------------
    def _base_weight_fp(self) -> torch.Tensor:
        weight = self.get_base_layer().in_proj_weight
        return weight.detach().to(torch.promote_types(weight.dtype, torch.float32))

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        base.in_proj_weight.data = weight.to(base.in_proj_weight.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s B A` (3E, E) for in_proj, in the dtype of `in_proj_weight`."""
        return self._delta_fp32(adapter_name).to(self.get_base_layer().in_proj_weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge into `in_proj_weight` and `out_proj.weight` (upstream merges both together)."""
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for out in self._out_layers():
            out.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        if self.merged:
            super().unmerge()
        elif not any(out.merged for out in self._out_layers()):
            super().unmerge()  # warns: nothing to do
        for out in self._out_layers():
            if out.merged:
                out.unmerge()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.MultiheadAttention:
        """The plain attention (its plain `out_proj` back in place), after merging when `merge`."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        base.out_proj = self.out_proj
        return base

    def _restore_weights(self) -> None:
        """Upstream re-registers the weights it swapped during its forward; this layer never swaps them (no-op)."""

    # --- forward ------------------------------------------------------------------------------------------------
    def _updated_weight(self, layer: LoraLayer, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """`W + c sum_a s_a B_a A_a` over `layer`'s active, unmerged adapters (differentiable; `c` the layer's
        `update_count`, 1 for in_proj), or None if none."""
        names = layer._lora_active()
        if not names:
            return None
        count = getattr(layer, "update_count", 1)
        delta = sum((layer.lora_B[n].weight @ layer.lora_A[n].weight) * (layer.scaling[n] * count) for n in names)
        return weight + delta.to(weight.dtype)  # (out, in)

    def forward(self, query: torch.Tensor, *args, **kwargs):
        base = self.get_base_layer()
        if self.disable_adapters:
            self.unmerge() if (self.merged or any(o.merged for o in self._out_layers())) else None
            return base(query, *args, **kwargs)
        swaps = [(base, "in_proj_weight", self._updated_weight(self, base.in_proj_weight))]
        for out in self._out_layers():
            linear = out.get_base_layer()
            swaps.append((linear, "weight", self._updated_weight(out, linear.weight)))
        with _shadowed([(m, n, w) for m, n, w in swaps if w is not None]):
            return base(query, *args, **kwargs)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
