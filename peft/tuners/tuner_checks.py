"""Checks `BaseTuner` runs while injecting: tied weights, `modules_to_save` names that
would wrap a piece of an adapter layer."""

from __future__ import annotations

import warnings

from torch import nn

from .tuner_layer import BaseTunerLayer


def _warn_if_weights_are_tied(model: nn.Module, keys: list[str]) -> None:
    """Warn when an adapted layer shares its weight with another module (e.g. GPT-2's `wte` and `lm_head`):
    merging writes `W + s B A` into the shared tensor, so the other module changes too."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    for key in keys:
        names = owners.get(id(getattr(model.get_submodule(key).get_base_layer(), "weight", None)), [])
        others = [n for n in names if n != key and not n.startswith(key + ".")]
        if others:
            warnings.warn(f"Adapted layer {key!r} shares its weight with {others} (tied weights): merging the adapter "
                          "changes those modules too, so the merged model differs from the adapter model.")


def _refuse_names_inside_tuner_layers(model: nn.Module, names: list[str], wrapper_cls: type, adapter_name: str) -> None:
    """A `modules_to_save` name that only matches inside a tuner layer (e.g. `lin.lora_A.<adapter>` when the adapter
    is named like the module) would wrap a piece of the adapter itself: refused before anything is wrapped."""
    tuner_layers = {key: m for key, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    for key, _ in model.named_modules():
        if not any(key == n or key.endswith("." + n) for n in names):
            continue
        owner = next((m for k, m in tuner_layers.items() if key.startswith(k + ".") and k), None)
        if owner is not None:
            raise ValueError(f"You are trying to target a module with {wrapper_cls} that is a child of {type(owner)}. "
                             "This is almost certainly not the intended behavior. Please ensure that the adapter "
                             f"name, {adapter_name!r}, does not conflict with any of the targeted modules "
                             f"(modules_to_save={names} matches {key!r}, a part of that adapter layer).")
