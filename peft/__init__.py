"""Parameter-efficient fine-tuning: upstream PEFT's API and adapter format, with LoRA-GA and LoRA-Pro."""

__version__ = "0.22.0+gapro"

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig
from .functional import get_base_model_state_dict, set_base_model_state_dict
from .mapping import get_peft_config, get_peft_model, inject_adapter_in_model
from .mixed_model import PeftMixedModel
from .peft_model import PeftModel
from .peft_model_tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .registry import register_peft_method
from .tuners.adalora import AdaLoraConfig, AdaLoraModel
from .tuners.dylora import DyLoRAConfig, DyLoRAModel
from .tuners.krona import KronAConfig, KronAModel
from .tuners.loha import LoHaConfig, LoHaModel
from .tuners.lokr import LoKrConfig, LoKrModel
from .tuners.lora import LoraConfig, LoraModel
from .tuners.lora.corda import CordaConfig
from .tuners.lora.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from .tuners.lora.init_methods import LoftQConfig
from .tuners.loraga import LoraGAConfig, LoraGAModel
from .tuners.loraga.upstream import preprocess_loraga
from .tuners.lorapro import LoraProConfig, LoraProModel
from .tuners.prompt_learning import (
    PrefixTuningConfig,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .tuners.sora import SoraConfig, SoraGateProximal, SoraModel
from .tuners.tiedlora import TiedLoraConfig, TiedLoraModel
from .tuners.vera import VeraConfig, VeraModel
from .utils import PeftType, TaskType, prepare_model_for_kbit_training
from .utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .utils.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .utils.warning import PeftWarning

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoftQConfig",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "CordaConfig",
    "EvaConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraGAModel",
    "LoraModel",
    "LoraProConfig",
    "LoraProModel",
    "KronAConfig",
    "KronAModel",
    "DyLoRAConfig",
    "DyLoRAModel",
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SoraConfig",
    "SoraGateProximal",
    "SoraModel",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "TiedLoraConfig",
    "TiedLoraModel",
    "VeraConfig",
    "VeraModel",
    "get_layer_status",
    "get_model_status",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "preprocess_loraga",
    "register_peft_method",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "LoraGACallback",
]


def __getattr__(name: str):
    """`LoraGACallback` subclasses transformers' `TrainerCallback`: imported on first use, so `import peft` does not
    import transformers."""
    if name == "LoraGACallback":
        from .tuners.loraga.callback import LoraGACallback

        return LoraGACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
