"""Configs of upstream's prompt-learning methods (prefix tuning, prompt tuning, P-tuning), without their tuners.

This package does not implement prompt learning. The configs exist so that clients which import them at module
level (TRL's trainers do, for `isinstance` checks) keep working, and so that an `adapter_config.json` written by
upstream PEFT for one of these methods loads and saves with upstream's field names and defaults. Building a model
from one of them raises `NotImplementedError` (see `not_implemented_error`) before the model is touched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from ...config import PeftConfig, _to_enum
from ...registry import PEFT_TYPE_TO_CONFIG_MAPPING
from ...utils.peft_types import PeftType


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning initialises its virtual-token embeddings."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network P-tuning uses to produce its virtual-token embeddings."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (virtual tokens prepended to the input or to each layer).

    Args:
        num_virtual_tokens: number of virtual tokens. token_dim: hidden size of the base model's embeddings.
        num_transformer_submodules: 1 for decoder-only models, 2 for encoder-decoder models.
        num_attention_heads / num_layers: the base model's, needed by prefix tuning for its key/value prefixes.
        modules_to_save: modules trained and saved whole (e.g. a classification head).
    """

    num_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Number of virtual tokens."})
    token_dim: Optional[int] = field(default=None, metadata={"help": "Hidden size of the base model."})
    num_transformer_submodules: Optional[int] = field(default=None, metadata={"help": "1 (decoder) or 2 (enc-dec)."})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Attention heads of the base."})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Transformer layers of the base."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})

    # Human-readable name of the method, for error messages.
    method_name: ClassVar[str] = "prompt learning"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                     "num_layers"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0), name,
                   value, "None or a positive int")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def is_prompt_learning(self) -> bool:
        return True


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes in every attention layer.

    Args:
        init_weights: None (random prefixes) or "zero" (prefixes that leave the activations unchanged).
        encoder_hidden_size: hidden size of the projection MLP. prefix_projection: pass the prefixes through it.
    """

    init_weights: Optional[Literal["zero"]] = field(default=None, metadata={"help": "None or 'zero'."})
    encoder_hidden_size: Optional[int] = field(default=None, metadata={"help": "Hidden size of the projection."})
    prefix_projection: bool = field(default=False, metadata={"help": "Project the prefixes through an MLP."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.PREFIX_TUNING
    method_name: ClassVar[str] = "prefix tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.init_weights in (None, "zero"), "init_weights", self.init_weights, "None or 'zero'")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): trained embeddings of virtual tokens prepended to the input.

    Args:
        prompt_tuning_init: "RANDOM", "SAMPLE_VOCAB" (embeddings of random vocabulary tokens) or "TEXT" (embeddings
            of `prompt_tuning_init_text`, tokenized with `tokenizer_name_or_path` and `tokenizer_kwargs`).
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = field(
        default=PromptTuningInit.RANDOM, metadata={"help": "'RANDOM', 'SAMPLE_VOCAB' or 'TEXT'."}
    )
    prompt_tuning_init_text: Optional[str] = field(default=None, metadata={"help": "Init text (TEXT only)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer (TEXT only)."})
    tokenizer_kwargs: Optional[dict] = field(default=None, metadata={"help": "Tokenizer kwargs (TEXT only)."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.PROMPT_TUNING
    method_name: ClassVar[str] = "prompt tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = _to_enum(PromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text:
            _check(bool(self.tokenizer_name_or_path), "tokenizer_name_or_path", self.tokenizer_name_or_path,
                   "a tokenizer name or path when prompt_tuning_init='TEXT'")
            _check(self.prompt_tuning_init_text is not None, "prompt_tuning_init_text", None,
                   "a string when prompt_tuning_init='TEXT'")
        _check(text or not self.tokenizer_kwargs, "tokenizer_kwargs", self.tokenizer_kwargs,
               "to be set only with prompt_tuning_init='TEXT'")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021): virtual-token embeddings produced by a small MLP or LSTM encoder.

    Args:
        encoder_reparameterization_type: "MLP" or "LSTM". encoder_hidden_size: its hidden size.
        encoder_num_layers: its depth. encoder_dropout: its dropout probability.
    """

    encoder_reparameterization_type: Union[PromptEncoderReparameterizationType, str] = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={"help": "'MLP' or 'LSTM'."}
    )
    encoder_hidden_size: Optional[int] = field(default=None, metadata={"help": "Hidden size of the encoder."})
    encoder_num_layers: int = field(default=2, metadata={"help": "Layers of the encoder."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout of the encoder."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.P_TUNING
    method_name: ClassVar[str] = "P-tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _to_enum(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type"
        )
        _check(isinstance(self.encoder_dropout, (int, float)) and 0.0 <= self.encoder_dropout < 1.0,
               "encoder_dropout", self.encoder_dropout, "a probability in [0, 1)")


def not_implemented_error(config: PromptLearningConfig) -> NotImplementedError:
    """The error raised wherever a model would be built from a prompt-learning config."""
    return NotImplementedError(
        f"{config.method_name} ({config.peft_type.value}) is a prompt-learning method, which this package does not "
        "implement; only its config exists here (so that adapter_config.json files and clients such as TRL load). "
        "Use LoraConfig, LoraGAConfig or LoraProConfig, or upstream PEFT for prompt learning."
    )


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}: expected {expected}.")


# Config-only registration: `PeftConfig.from_pretrained` finds these classes by peft_type; no tuner is registered.
for _config_cls in (PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig):
    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(_config_cls.peft_type_default, _config_cls)
