"""Utilities (upstream's import paths)."""

from .constants import CONFIG_NAME, INCLUDE_LINEAR_LAYERS_SHORTHAND, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .other import ModulesToSaveWrapper, _get_submodules, get_submodules, infer_device, prepare_model_for_kbit_training
from .peft_types import PeftType, TaskType
from .save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .warning import PeftWarning

__all__ = [
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "ModulesToSaveWrapper",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "_get_submodules",
    "get_peft_model_state_dict",
    "get_submodules",
    "infer_device",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]


def __getattr__(name: str):
    """`TrainableTokensWrapper` (upstream exports it here), loaded lazily: it builds on the tuners."""
    if name == "TrainableTokensWrapper":
        from ..tuners.trainable_tokens.wrapper import TrainableTokensWrapper

        return TrainableTokensWrapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
