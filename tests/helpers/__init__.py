"""Shared test helpers: tiny offline models (`tiny_models`) and LoRA invariant checks (`lora_checks`)."""

from .tiny_models import (
    TINY_MODELS,
    TinyModelSpec,
    TinyNet,
    model_output,
    tiny_bert_classifier,
    tiny_custom,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_ids,
)

__all__ = [
    "TINY_MODELS",
    "TinyModelSpec",
    "TinyNet",
    "model_output",
    "tiny_bert_classifier",
    "tiny_custom",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_t5",
    "token_ids",
]
