"""Find LoRA-Pro (A, B) pairs from the tuner layers that own them, never from names or parameter order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..tuners.lora.layer import LoraLayer
from ..tuners.lorapro.layer import LoraProLayer, LoraProOptions, live_lorapro_layers


@dataclass(frozen=True)
class LoraProPair:
    """One adapter of one LoRA-Pro layer: its factors A, B (parameters as stored) and the layer that owns them."""

    layer: LoraProLayer
    adapter_name: str
    A: nn.Parameter
    B: nn.Parameter

    @property
    def options(self) -> LoraProOptions:
        return self.layer.lorapro_options[self.adapter_name]

    @property
    def scaling(self) -> float:
        return self.layer.lorapro_scaling(self.adapter_name)


def _adapters(layer: LoraProLayer) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(adapter name, A, B) for every LoRA-Pro adapter still present on `layer`, frozen or not."""
    out = []
    for name in layer.lorapro_options:
        try:
            A, B = layer.lorapro_factors(name)
        except KeyError:  # adapter deleted since
            continue
        out.append((name, A, B))
    return out


def _frozen_partner_error(adapter_name: str, where: str, A: torch.Tensor) -> ValueError:
    frozen = "A" if not A.requires_grad else "B"
    return ValueError(
        f"LoRA-Pro adapter {adapter_name!r} of {where}: {frozen} is frozen but its partner is trainable; LoRA-Pro "
        "updates A and B together (train both or freeze both)."
    )


def _layer_pairs(layer: LoraProLayer, where: str) -> list[LoraProPair]:
    pairs = []
    for name, A, B in _adapters(layer):
        if A.requires_grad != B.requires_grad:
            raise _frozen_partner_error(name, where, A)
        if A.requires_grad:
            pairs.append(LoraProPair(layer, name, A, B))
    return pairs


def lorapro_pairs(model: nn.Module) -> list[LoraProPair]:
    """Every trainable (A, B) pair of the LoRA-Pro layers of `model`, in module order.

    Raises ValueError when `model` has no LoRA-Pro layer, when one factor of a pair is frozen and the other is not,
    or when no pair is trainable."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"Expected the model (an nn.Module) whose LoRA-Pro layers to train, got {type(model)!r}.")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraProLayer)]
    if not layers:
        plain = any(isinstance(m, LoraLayer) for m in model.modules())
        hint = " It has plain LoRA layers: build it with LoraProConfig instead of LoraConfig." if plain else ""
        raise ValueError(
            f"{type(model).__name__} has no LoRA-Pro layers; wrap it with get_peft_model(model, LoraProConfig(...))."
            + hint
        )
    pairs = [p for name, layer in layers for p in _layer_pairs(layer, name or "the model")]
    if not pairs:
        raise ValueError(f"{type(model).__name__} has LoRA-Pro layers but none of their A/B factors is trainable.")
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
    """The pairs formed by `params` (trainable ones only), found through the live LoRA-Pro layers that own them.

    Only the layers owning one of `params` are looked at (other models in the process do not matter). Raises
    ValueError for a parameter that no LoRA-Pro layer owns, or whose partner factor is frozen or not in `params`."""
    params = list(params)
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):  # e.g. a param-group dict: its tensors would be silently left out
            raise ValueError(f"Parameter #{index} is a {type(param).__name__}, expected a tensor (AdamWLoRAPro takes "
                             "the LoRA-Pro A/B parameters themselves, not parameter groups).")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("AdamWLoRAPro got no trainable parameters.")
    owner = _owners()
    given = {id(p) for p in params}
    pairs, seen = [], set()
    for index, param in enumerate(params):
        if id(param) not in owner:
            raise ValueError(
                f"Parameter #{index} (shape {tuple(param.shape)}) is not a factor of any LoRA-Pro layer, so it cannot "
                "be paired; AdamWLoRAPro takes LoRA-Pro A/B factors only (use LoraProAdamW(model) to also train "
                "other parameters)."
            )
        pair, role = owner[id(param)]
        partner = pair.B if role == "A" else pair.A
        if not partner.requires_grad:
            raise _frozen_partner_error(pair.adapter_name, type(pair.layer).__name__, pair.A)
        if id(partner) not in given:
            raise ValueError(
                f"Parameter #{index} is the {role} factor of LoRA-Pro adapter {pair.adapter_name!r} but its partner "
                f"{'B' if role == 'A' else 'A'} is not among the parameters; pass both."
            )
        if id(pair.A) not in seen:
            seen.add(id(pair.A))
            pairs.append(pair)
    return pairs


def _owners() -> dict[int, tuple[LoraProPair, str]]:
    """id of every A and B factor of the live LoRA-Pro layers -> (its pair, "A" or "B")."""
    owner: dict[int, tuple[LoraProPair, str]] = {}
    for layer in live_lorapro_layers():
        for name, A, B in _adapters(layer):
            pair = LoraProPair(layer, name, A, B)
            owner[id(A)], owner[id(B)] = (pair, "A"), (pair, "B")
    return owner


def pairs_in_groups(groups: list[dict]) -> list[LoraProPair]:
    """The pairs among the trainable parameters of an optimizer's param groups (e.g. the decay / no-decay groups
    transformers' Trainer passes to an `optimizer_cls_and_kwargs` class), found through the live LoRA-Pro layers that
    own them. Parameters that are no LoRA-Pro factor are not paired (the optimizer steps them as plain AdamW).

    Raises ValueError when a trainable factor's partner is frozen, absent from the groups or in another group (A
    and B step together, with one group's hyperparameters), or when no factor is found at all."""
    owner = _owners()
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
                raise ValueError(f"The {role} factor of LoRA-Pro adapter {pair.adapter_name!r} is in param group "
                                 f"#{index} but its partner {other} {where}; LoRA-Pro steps A and B together, so give "
                                 "both to the same group.")
            if id(pair.A) not in seen:
                seen.add(id(pair.A))
                pairs.append(pair)
    if not pairs:
        raise ValueError("LoraProAdamW got no LoRA-Pro factor among its parameters: build the model with "
                         "get_peft_model(model, LoraProConfig(...)) and give the optimizer its trainable parameters "
                         "(or the model itself).")
    return pairs
