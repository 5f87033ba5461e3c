"""One table per fact about a tuner type, filled by `register_peft_method`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .utils.peft_types import PeftType

if TYPE_CHECKING:
    from .config import PeftConfig
    from .tuners.tuners_utils import BaseTuner

PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type["PeftConfig"]] = {}
PEFT_TYPE_TO_TUNER_MAPPING: dict[PeftType, type["BaseTuner"]] = {}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[PeftType, str] = {}


def register_peft_method(
    *,
    name: str,
    config_cls: type["PeftConfig"],
    model_cls: type["BaseTuner"],
    prefix: str | None = None,
    is_mixed_compatible: bool = False,
) -> None:
    """Register a tuner type: `name` is the lower-case value of its `PeftType` member (e.g. "lora")."""
    try:
        peft_type = PeftType(name.upper())
    except ValueError:
        known = ", ".join(p.value.lower() for p in PeftType)
        raise ValueError(f"Unknown PEFT method name {name!r}; add it to PeftType first (known: {known}).") from None
    if getattr(config_cls, "peft_type_default", None) not in (None, peft_type):
        raise ValueError(f"{config_cls.__name__} declares peft_type {config_cls.peft_type_default}, not {peft_type}.")
    prefix = prefix or f"{name}_"
    if not getattr(model_cls, "prefix", None):
        raise ValueError(f"{model_cls.__name__} must define a class attribute `prefix`.")
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING and PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is not config_cls:
        raise KeyError(f"PEFT method {name!r} is already registered with {PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]}.")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    if is_mixed_compatible:
        MIXED_COMPATIBLE_TYPES.add(peft_type)


MIXED_COMPATIBLE_TYPES: set[PeftType] = set()
