"""Prompt-learning configs (prefix tuning, prompt tuning, P-tuning) and P-tuning's `PromptEncoder` module; no tuner
(model) for these methods in this package."""

from .config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    not_implemented_error,
)
from .encoder import PromptEncoder

__all__ = [
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "not_implemented_error",
]
