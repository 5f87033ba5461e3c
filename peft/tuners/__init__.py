"""Tuner types. Each lives in its own folder and registers itself there (`register_peft_method` in its
`__init__.py`), so importing the folder is all it takes; `prompt_learning` holds configs only (registered for lookup
by peft_type, with no tuner)."""

from .adalora import AdaLoraConfig, AdaLoraModel
from .dylora import DyLoRAConfig, DyLoRAModel
from .krona import KronAConfig, KronAModel
from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora import LoraConfig, LoraModel
from .prompt_learning import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .sora import SoraConfig, SoraModel
from .tiedlora import TiedLoraConfig, TiedLoraModel
from .vera import VeraConfig, VeraModel

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "DyLoRAConfig",
    "DyLoRAModel",
    "KronAConfig",
    "KronAModel",
    "LoraConfig",
    "LoraModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SoraConfig",
    "SoraModel",
    "TiedLoraConfig",
    "TiedLoraModel",
    "VeraConfig",
    "VeraModel",
]
