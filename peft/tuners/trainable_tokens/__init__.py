"""Trainable tokens: train a few rows of an embedding (new tokens) beside a LoRA adapter, as upstream PEFT's
`LoraConfig(trainable_token_indices=...)`."""

from .inject import inject_trainable_tokens
from .layer import TrainableTokensLayer
from .wrapper import TrainableTokensWrapper

__all__ = ["TrainableTokensLayer", "TrainableTokensWrapper", "inject_trainable_tokens"]
