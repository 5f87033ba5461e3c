"""Prompt-learning configs (prefix tuning, prompt tuning, P-tuning): configs only, no tuner in this package."""

from .config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    not_implemented_error,
)

__all__ = [
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "not_implemented_error",
]
