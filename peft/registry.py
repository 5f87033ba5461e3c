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
    extend_peft_type: bool = False,
) -> None:
    """Register a tuner type: `name` is the lower-case value of its `PeftType` member (e.g. "lora"), `config_cls` a
    `PeftConfig` subclass, `model_cls` a `BaseTuner` subclass whose `prefix` starts its parameter names (and the
    names of its layers' adapter containers). Each tuner folder calls this once, in its `__init__.py`.

    A type defined outside this package (a plugin, a test) passes `extend_peft_type=True` to add `name.upper()` to
    `PeftType` instead of editing it; without it an unknown name is refused (a typo would otherwise register)."""
    from .config import PeftConfig
    from .tuners.tuners_utils import BaseTuner

    if not isinstance(name, str):
        raise ValueError(f"name must be a str such as 'lora', got {name!r}.")
    try:
        peft_type = PeftType(name.upper())
    except ValueError:
        if not extend_peft_type:
            known = ", ".join(p.value.lower() for p in PeftType)
            raise ValueError(f"Unknown PEFT method name {name!r}; add it to PeftType first, or pass "
                             f"extend_peft_type=True for a type defined outside peft (known: {known}).") from None
        peft_type = _add_peft_type(name.upper())
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise ValueError(f"config_cls must be a PeftConfig subclass, got {config_cls!r}.")
    if not (isinstance(model_cls, type) and issubclass(model_cls, BaseTuner)):
        raise ValueError(f"model_cls must be a BaseTuner subclass, got {model_cls!r}.")
    if getattr(config_cls, "peft_type_default", None) not in (None, peft_type):
        raise ValueError(f"{config_cls.__name__} declares peft_type {config_cls.peft_type_default}, not {peft_type}.")
    if not getattr(model_cls, "prefix", None):
        raise ValueError(f"{model_cls.__name__} must define a class attribute `prefix`.")
    if prefix is not None and prefix != model_cls.prefix:
        raise ValueError(f"prefix={prefix!r} differs from {model_cls.__name__}.prefix={model_cls.prefix!r}.")
    prefix = model_cls.prefix
    for table, new in ((PEFT_TYPE_TO_CONFIG_MAPPING, config_cls), (PEFT_TYPE_TO_TUNER_MAPPING, model_cls)):
        if peft_type in table and table[peft_type] is not new:
            raise KeyError(f"PEFT method {name!r} is already registered with {table[peft_type]}.")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    _PREFIXES[0] = tuple(sorted(set(PEFT_TYPE_TO_PREFIX_MAPPING.values())))
    if is_mixed_compatible:
        MIXED_COMPATIBLE_TYPES.add(peft_type)


MIXED_COMPATIBLE_TYPES: set[PeftType] = set()


def _add_peft_type(value: str) -> PeftType:
    """A new `PeftType` member `value` (name == value, as for every member), for types registered from outside."""
    if not value.isidentifier():
        raise ValueError(f"A new PEFT method name must be an identifier such as 'my_method', got {value.lower()!r}.")
    member = str.__new__(PeftType, value)
    member._name_, member._value_, member.__objclass__ = value, value, PeftType
    type.__setattr__(PeftType, value, member)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    return member


_PREFIXES: list[tuple[str, ...]] = [()]  # kept in step with PEFT_TYPE_TO_PREFIX_MAPPING by register_peft_method


def adapter_prefixes() -> tuple[str, ...]:
    """The registered tuner types' parameter-name prefixes (each type's `prefix`): a module or parameter name with
    a part starting with one of them belongs to an adapter, not to the base model. Computed at registration, since
    target matching asks once per module name."""
    return _PREFIXES[0]
