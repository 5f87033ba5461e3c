"""Find LoRA-Pro (A, B) pairs from the LoRA tuner layers that own them, never from names or parameter order.

Any `LoraLayer` works: the layers of a `LoraProConfig` model (LoRA-Pro layers, which carry their adapter's
`LoraProOptions`) and those of a plain `LoraConfig` model (their options are `LoraProOptions()`, `LoraProConfig`'s
defaults, unless the optimizer is given others)."""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, replace
from typing import Iterable, Optional

import torch
from torch import nn

from ..tuners.lora.layer import LoraLayer, live_lora_layers
from ..tuners.lora.param_wrapper import ParamWrapper, expert_factors, stack_factors
from ..tuners.lorapro import math as lp
from ..tuners.lorapro.layer import (
    LoraProLayer,
    LoraProOptions,
    check_lorapro_rank,
    lora_adapter_names,
    lora_adjusted_gradients,
    lora_dropout_p,
    lora_factors,
    lora_matrices,
)
from ..tuners.tuners_utils import BaseTuner
from .sharding import refuse_flattened_factor

_DEFAULT_OPTIONS = LoraProOptions()


@dataclass(frozen=True)
class LoraProPair:
    """One adapter of one LoRA layer: its factors A, B (parameters as stored), the layer that owns them and, when the
    pairs were found from a model, the layer's module name."""

    layer: LoraLayer
    adapter_name: str
    A: nn.Parameter
    B: nn.Parameter
    name: str = ""

    @property
    def options(self) -> LoraProOptions:
        """The layer's LoRA-Pro options for this adapter; `LoraProConfig`'s defaults on a plain LoRA layer."""
        if isinstance(self.layer, LoraProLayer) and self.adapter_name in self.layer.lorapro_options:
            return self.layer.lorapro_options[self.adapter_name]
        return _DEFAULT_OPTIONS

    @property
    def num_experts(self) -> int:
        """E > 1 for LoRA on a fused 3-D expert stack (`ParamWrapper`): E independent (A_e, B_e) pairs in one."""
        return num_experts(self.layer)

    @property
    def scaling(self) -> float:
        """s of this adapter, read from the layer: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
        return float(self.layer.scaling[self.adapter_name])

    def current(self) -> "LoraProPair":
        """This pair with the factors its layer holds now: `fully_shard` (FSDP2) replaces each parameter by a new
        DTensor parameter, and accelerate then swaps the optimizer's parameters to those."""
        A, B = lora_factors(self.layer, self.adapter_name)
        return self if (A is self.A and B is self.B) else replace(self, A=A, B=B)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, n), B (m, r)) views of the factors; for an expert stack (A (E, r, n), B (E, m, r))."""
        if self.num_experts > 1:
            A, B = lora_factors(self.layer, self.adapter_name)
            return expert_factors(A.detach(), B.detach(), self.num_experts)
        return lora_matrices(self.layer, self.adapter_name)

    def adjusted_gradients(self, grad_A: torch.Tensor, grad_B: torch.Tensor, x_mode: str, damping: float,
                           grams: Optional[lp.Grams] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA-Pro's `(gA', gB')` (paper eq. 8), shaped like the factors; per expert for an expert stack."""
        if self.num_experts > 1:
            A, B = self.matrices()  # (E, r, n), (E, m, r)
            gA, gB = expert_factors(grad_A, grad_B, self.num_experts)
            new_gA, new_gB = lp.adjusted_gradients(A, B, gA, gB, self.scaling, x_mode, damping, grams)
            return stack_factors(new_gA, new_gB)
        return lora_adjusted_gradients(self.layer, self.adapter_name, grad_A, grad_B, x_mode, damping, grams)

    def describe(self) -> str:
        """How error messages name this pair: its module name (found from the model, or, for pairs found from
        parameters, looked up in the live tuners: an error path, not a hot one), else the layer's type and shape."""
        name = self.name or _module_name(self.layer)
        if name:
            return f"layer {name!r} (adapter {self.adapter_name!r})"
        A, B = self.matrices()
        return (f"a {type(self.layer).__name__} layer with update shape {tuple(B.shape[:1]) + tuple(A.shape[1:])} "
                f"(adapter {self.adapter_name!r})")


def num_experts(layer: LoraLayer) -> int:
    """How many independent updates a layer's factors hold: E for a 3-D `ParamWrapper`, else 1."""
    return int(getattr(layer, "num_experts", 1)) if isinstance(layer, ParamWrapper) else 1


def refuse_expert_stacks(pairs: list["LoraProPair"]) -> None:
    """`LoraProAdamW` steps each pair as one (m, n) matrix; an expert stack is E of them: refuse it (the gradient
    hook, `register_lorapro_adjustment`, adjusts expert stacks per expert)."""
    stacks = [pair for pair in pairs if pair.num_experts > 1]
    if stacks:
        raise ValueError(
            f"LoraProAdamW does not step LoRA on fused expert stacks yet: {stacks[0].describe()} holds "
            f"{stacks[0].num_experts} experts (target_parameters on a 3-D parameter). Use "
            "register_lorapro_adjustment(model) with a plain optimizer, or leave these parameters out of the "
            "optimizer's LoRA-Pro pairs.")


def _module_name(layer: nn.Module) -> str:
    """`layer`'s name in the model of a live tuner (e.g. "model.layers.0.self_attn.q_proj"), "" if none holds it."""
    for tuner in (obj for obj in gc.get_objects() if issubclass(type(obj), BaseTuner)):
        for name, module in tuner.model.named_modules():
            if module is layer:
                return name
    return ""


def _adapters(layer: LoraLayer) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(adapter name, A, B) for every adapter present on `layer`, frozen or not."""
    return [(name, *lora_factors(layer, name)) for name in lora_adapter_names(layer)]


def _frozen_partner_error(adapter_name: str, where: str, A: torch.Tensor) -> ValueError:
    frozen = "A" if not A.requires_grad else "B"
    return ValueError(
        f"LoRA-Pro adapter {adapter_name!r} of {where}: {frozen} is frozen but its partner is trainable; LoRA-Pro "
        "updates A and B together (train both or freeze both)."
    )


def _check_rank(layer: LoraLayer, adapter: str, where: str = "") -> None:
    """`check_lorapro_rank`, after refusing factors that FSDP1 flattened (they have no rows to check)."""
    for role, factor in zip("AB", lora_factors(layer, adapter)):
        refuse_flattened_factor(factor, f"{role} of LoRA adapter {adapter!r} of {where or type(layer).__name__}")
    if num_experts(layer) > 1:  # r of each expert against its own (m, n)
        r, m, n = layer.r[adapter], layer.out_features, layer.in_features
        if r > min(m, n):
            raise ValueError(f"LoRA-Pro needs r <= min(out, in) of every adapted layer; {where or 'an expert stack'} "
                             f"has r={r} per expert, update shape ({m}, {n}). Lower r (or use rank_pattern).")
        return
    check_lorapro_rank(layer, adapter, where)


def _layer_pairs(layer: LoraLayer, where: str, name: str) -> list[LoraProPair]:
    pairs = []
    for adapter, A, B in _adapters(layer):
        if A.requires_grad != B.requires_grad:
            raise _frozen_partner_error(adapter, where, A)
        if A.requires_grad:
            _check_rank(layer, adapter, where)
            pairs.append(LoraProPair(layer, adapter, A, B, name))
    return pairs


def lorapro_pairs(model: nn.Module) -> list[LoraProPair]:
    """Every trainable (A, B) pair of the LoRA layers (LoRA-Pro or plain LoRA) of `model`, in module order.

    Raises ValueError when `model` has no LoRA layer, when one factor of a pair is frozen and the other is not,
    when r exceeds a dimension of an adapted layer, or when no pair is trainable."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"Expected the model (an nn.Module) whose LoRA layers to train, got {type(model)!r}.")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers; wrap it with get_peft_model(model, LoraProConfig(...)) "
            "(or LoraConfig(...))."
        )
    pairs = [p for name, layer in layers for p in _layer_pairs(layer, name or "the model", name)]
    if not pairs:
        raise ValueError(f"{type(model).__name__} has LoRA layers but none of their A/B factors is trainable.")
    return _dedupe(pairs)


def _dedupe(pairs: list[LoraProPair]) -> list[LoraProPair]:
    """A layer reached twice (shared submodule) gives one pair."""
    seen, out = set(), []
    for pair in pairs:
        if id(pair.A) not in seen:
            seen.add(id(pair.A))
            out.append(pair)
    return out


def pairs_from_parameters(params: Iterable[torch.Tensor]) -> list[LoraProPair]:
    """The pairs formed by `params` (trainable ones only), found through the live LoRA layers that own them.

    Raises ValueError for a parameter that no LoRA layer owns, or whose partner factor is frozen or not in
    `params`."""
    params = list(params)
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):  # e.g. a param-group dict: its tensors would be silently left out
            raise ValueError(f"Parameter #{index} is a {type(param).__name__}, expected a tensor (AdamWLoRAPro takes "
                             "the LoRA A/B parameters themselves, not parameter groups).")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("AdamWLoRAPro got no trainable parameters.")
    owner = _owners(params)
    given = {id(p) for p in params}
    pairs, seen = [], set()
    for index, param in enumerate(params):
        if id(param) not in owner:
            raise ValueError(
                f"Parameter #{index} (shape {tuple(param.shape)}) is not a factor of any LoRA layer, so it cannot "
                "be paired; AdamWLoRAPro takes LoRA A/B factors only (use LoraProAdamW(model) to also train "
                "other parameters)."
            )
        pair, role = owner[id(param)]
        partner = pair.B if role == "A" else pair.A
        if not partner.requires_grad:
            raise _frozen_partner_error(pair.adapter_name, type(pair.layer).__name__, pair.A)
        if id(partner) not in given:
            raise ValueError(
                f"Parameter #{index} is the {role} factor of LoRA adapter {pair.adapter_name!r} but its partner "
                f"{'B' if role == 'A' else 'A'} is not among the parameters; pass both."
            )
        if id(pair.A) not in seen:
            _check_rank(pair.layer, pair.adapter_name)
            seen.add(id(pair.A))
            pairs.append(pair)
    return pairs


def _owners(params: list[torch.Tensor]) -> dict[int, tuple[LoraProPair, str]]:
    """id of every A and B factor of the live LoRA layers -> (its pair, "A" or "B").

    Every LoRA layer (LoRA-Pro's included) is registered, weakly, when made (`live_lora_layers`)."""
    owner: dict[int, tuple[LoraProPair, str]] = {}

    def add(layers: Iterable[LoraLayer]) -> None:
        for layer in layers:
            for name, A, B in _adapters(layer):
                pair = LoraProPair(layer, name, A, B)
                owner.setdefault(id(A), (pair, "A"))
                owner.setdefault(id(B), (pair, "B"))

    add(live_lora_layers())
    return owner


def pairs_in_groups(groups: list[dict]) -> list[LoraProPair]:
    """The pairs among the trainable parameters of an optimizer's param groups (e.g. the decay / no-decay groups
    transformers' Trainer passes to an `optimizer_cls_and_kwargs` class), found through the live LoRA layers that
    own them. Parameters that are no LoRA factor are not paired (the optimizer steps them as plain AdamW).

    Raises ValueError when a trainable factor's partner is frozen, absent from the groups or in another group (A
    and B step together, with one group's hyperparameters), or when no factor is found at all."""
    owner = _owners([p for group in groups for p in group["params"] if p.requires_grad])
    group_of = {id(p): index for index, group in enumerate(groups) for p in group["params"]}
    pairs, seen = [], set()
    for index, group in enumerate(groups):
        for param in group["params"]:
            if id(param) not in owner or not param.requires_grad:
                continue
            pair, role = owner[id(param)]
            partner, other = (pair.B, "B") if role == "A" else (pair.A, "A")
            if not partner.requires_grad:
                raise _frozen_partner_error(pair.adapter_name, type(pair.layer).__name__, pair.A)
            if group_of.get(id(partner)) != index:
                where = "is not among the parameters" if id(partner) not in group_of else "is in another param group"
                raise ValueError(f"The {role} factor of LoRA adapter {pair.adapter_name!r} is in param group "
                                 f"#{index} but its partner {other} {where}; LoRA-Pro steps A and B together, so give "
                                 "both to the same group.")
            if id(pair.A) not in seen:
                _check_rank(pair.layer, pair.adapter_name)
                seen.add(id(pair.A))
                pairs.append(pair)
    if not pairs:
        raise ValueError("LoraProAdamW got no LoRA factor among its parameters: build the model with "
                         "get_peft_model(model, LoraProConfig(...)) or LoraConfig(...) and give the optimizer its "
                         "trainable parameters (or the model itself).")
    return pairs


def warn_if_dropout(pairs: list[LoraProPair], stacklevel: int = 2) -> None:
    """One warning (not one per layer) when any pair's layer applies dropout to its adapter's input: LoRA-Pro then
    projects the gradient of the dropped-out inputs (docs/lorapro.md, "LoRA dropout"). `stacklevel`: of the
    user's call, counted from the caller of this function."""
    ps = sorted({p for p in (lora_dropout_p(pair.layer, pair.adapter_name) for pair in pairs) if p > 0})
    if ps:
        count = sum(lora_dropout_p(pair.layer, pair.adapter_name) > 0 for pair in pairs)
        warnings.warn(
            f"{count} of the {len(pairs)} LoRA layers trained with LoRA-Pro have lora_dropout > 0 (p = "
            f"{', '.join(f'{p:g}' for p in ps)}): their A/B gradients are those of a dropped-out input, so LoRA-Pro "
            "projects a perturbed full gradient, not dL/dW (see docs/lorapro.md, 'LoRA dropout'). Set lora_dropout=0 "
            "for the paper's setting.", UserWarning, stacklevel=stacklevel + 1)
