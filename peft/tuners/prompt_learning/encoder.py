"""`PromptEncoder`: P-tuning's reparameterisation of virtual-token embeddings (Liu et al. 2021, "GPT Understands, Too").

The trained table `E` (one row per virtual token, `n = num_virtual_tokens * num_transformer_submodules`) is not used
directly; the prompt is `f(E[indices])`, with `f` either

- MLP: `Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)` (always two hidden layers), or
- LSTM: a bidirectional LSTM (`encoder_num_layers` layers, hidden size `h`, dropout `encoder_dropout`) followed by
  `Linear(2h, 2h) -> ReLU -> Linear(2h, d)`,

where `d = token_dim` and `h = encoder_hidden_size` (`token_dim` when None). Submodule names (`embedding`,
`mlp_head`, `lstm_head`) follow upstream's, so its state dicts load. With `inference_mode=True` only the table
exists (the trained prompt is stored as embeddings) and the forward pass returns `E[indices]`.

This package has no P-tuning model (`get_peft_model` refuses prompt learning); the encoder is a standalone module.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType

MLP_HIDDEN_LAYERS = 2  # the MLP head's fixed depth; `encoder_num_layers` only sizes the LSTM


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(size_in, size_out))
    return nn.Sequential(*layers)


def _required(config: PromptEncoderConfig, name: str) -> int:
    value = getattr(config, name)
    if value is None:
        raise ValueError(f"Invalid {name}=None for PromptEncoder: expected a positive int (set it in the "
                         "PromptEncoderConfig; upstream's PeftModel fills it from the base model's config).")
    return value


class PromptEncoder(nn.Module):
    """Maps virtual-token indices `(batch, n_tokens)` to prompt embeddings `(batch, n_tokens, token_dim)`."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        self.token_dim = _required(config, "token_dim")
        self.total_virtual_tokens = (
            _required(config, "num_virtual_tokens") * _required(config, "num_transformer_submodules")
        )
        self.hidden_size = config.encoder_hidden_size or self.token_dim
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        self.lstm_head: Optional[nn.LSTM] = None
        self.mlp_head: Optional[nn.Sequential] = None
        if config.inference_mode:
            return
        d, h = self.token_dim, self.hidden_size
        if self.encoder_type is PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = _mlp([2 * h, 2 * h, d])
            return
        if config.encoder_num_layers != MLP_HIDDEN_LAYERS:
            warnings.warn(f"for {self.encoder_type.value}, the argument `encoder_num_layers` is ignored. "
                          f"Exactly {MLP_HIDDEN_LAYERS} MLP layers are used.")
        self.mlp_head = _mlp([d, h, h, d])

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)  # (batch, n_tokens, d)
        if self.lstm_head is not None:
            embeds = self.lstm_head(embeds)[0]  # (batch, n_tokens, 2h)
        return embeds if self.mlp_head is None else self.mlp_head(embeds)
