"""Extension points of LoRA that other tuner folders fill, so that LoRA imports none of them.

- Data-driven inits named by `LoraConfig.init_lora_weights` (upstream spells LoRA-GA `init_lora_weights="lora_ga"`):
  `register_lora_init(LoraInitHook(...))`; `LoraModel` looks the name up when it builds a layer.
- The save form of `save_pretrained`'s upstream keywords (`path_initial_model_for_weight_conversion`):
  `register_save_form(fn)`; `LoraModel.adapter_save_form` calls it.

`peft.tuners.loraga` registers both when it is imported (which `import peft` does).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class LoraInitHook:
    """A data-driven init. `init_layer(tuner, layer, config, adapter_name, key)` initialises one new layer;
    `around_injection(tuner)` (optional) is a context around the whole injection (e.g. to offset base weights only
    once every layer is in); `sub_config` the class of the config's sub-config for this init (upstream's
    `lora_ga_config`), if any; `exports` extra names `peft.tuners.lora` serves under upstream's import path."""

    name: str
    init_layer: Callable[..., None]
    around_injection: Optional[Callable[[Any], AbstractContextManager]] = None
    sub_config: Optional[type] = None
    exports: dict[str, Any] = field(default_factory=dict)


_INITS: dict[str, LoraInitHook] = {}
_SAVE_FORM: list[Callable] = []


def register_lora_init(hook: LoraInitHook) -> None:
    if hook.name in _INITS and _INITS[hook.name] is not hook:
        raise KeyError(f"A LoRA init named {hook.name!r} is already registered ({_INITS[hook.name]}).")
    _INITS[hook.name] = hook


def lora_init_hook(name) -> Optional[LoraInitHook]:
    """The registered init named `name` (a value of `init_lora_weights`), or None."""
    return _INITS.get(name) if isinstance(name, str) else None


def registered_export(name: str):
    """A name some init exports under `peft.tuners.lora` (upstream's path), or None."""
    for hook in _INITS.values():
        if name in hook.exports:
            return hook.exports[name]
    return None


def register_save_form(fn: Callable) -> None:
    """`fn(model, adapter_names, kwargs) -> (name, weights, config) -> (weights, config)`: see
    `peft.tuners.loraga.conversion.adapter_save_form`."""
    _SAVE_FORM[:] = [fn]


def save_form_provider() -> Optional[Callable]:
    return _SAVE_FORM[0] if _SAVE_FORM else None
