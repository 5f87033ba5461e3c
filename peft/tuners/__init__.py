"""Tuner types. Each lives in its own folder and registers itself in `peft/__init__.py`; `prompt_learning` holds
configs only (registered for lookup by peft_type, with no tuner)."""

from .lora import LoraConfig, LoraModel
from .prompt_learning import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

__all__ = [
    "LoraConfig",
    "LoraModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
]
