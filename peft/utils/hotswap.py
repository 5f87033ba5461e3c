"""Hot-swapping a loaded adapter in place (upstream's import path). The implementation is LoRA's:
`peft.tuners.lora.hotswap`."""

from ..tuners.lora.hotswap import (  # noqa: F401 (re-exports)
    CONFIG_KEYS_TO_CHECK,
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    padded,
    padded_grouped,
    prepare_model_for_compiled_hotswap,
)

__all__ = [
    "CONFIG_KEYS_TO_CHECK",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "padded",
    "padded_grouped",
    "prepare_model_for_compiled_hotswap",
]
