"""Tiny offline models for tests: every builder is seeded, built from a config (no download), and small enough
that a forward pass takes milliseconds on a CPU.

Each builder returns a fresh model in eval mode; building twice with the same `seed` gives identical weights, so
a test can rebuild "the same base" to load an adapter onto. `dtype=torch.float64` is what the exact-math checks use.

`TINY_MODELS` maps a short name to a `TinyModelSpec` (builder, input maker, LoRA targets, task type) so that
parametrised tests and other engineers' tests can loop over the same architectures:

    from tests.helpers.tiny_models import TINY_MODELS, model_output
    spec = TINY_MODELS["llama"]
    model = spec.build(dtype=torch.float64)
    out = model_output(model(**spec.inputs()))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

VOCAB = 64


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model.to(dtype).eval()


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, num_layers: int = 2):
    """Llama-style causal LM: hidden 16, 2 heads (GQA: 1 KV head), MLP 32, vocab 64, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False, attn_implementation="eager",
    )
    _seeded(seed)
    return _finish(LlamaForCausalLM(config), dtype)


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    """GPT-2 LM (Conv1D projections stored in x out): hidden 16, 2 layers, 2 heads, vocab 64, tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    _seeded(seed)
    return _finish(GPT2LMHeadModel(config), dtype)


def tiny_bert_classifier(dtype: torch.dtype = torch.float32, seed: int = 0, num_labels: int = 3):
    """BERT sequence classifier: hidden 16, 2 layers, 2 heads, 3 labels (head module: `classifier`)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels, attn_implementation="eager",
    )
    _seeded(seed)
    return _finish(BertForSequenceClassification(config), dtype)


def tiny_t5(dtype: torch.dtype = torch.float32, seed: int = 0):
    """T5 encoder-decoder: d_model 16, 2 encoder blocks, 1 decoder block, 2 heads, vocab 64."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    _seeded(seed)
    return _finish(T5ForConditionalGeneration(config), dtype)


class TinyNet(nn.Module):
    """A plain `nn.Module` (no transformers config) with every LoRA layer type but Conv1D.

    input_ids (B, 4, 4) -> `emb` (B, 4, 4, 8) -> (B, 8, 4, 4) -> `conv` 3x3 (B, 6, 4, 4) -> relu -> flatten
    -> `lin1` (96 -> 16, bias) -> relu -> `lin2` (16 -> 5, bias).
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.conv = nn.Conv2d(8, 6, kernel_size=3, padding=1)
        self.lin1 = nn.Linear(96, 16)
        self.lin2 = nn.Linear(16, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids).permute(0, 3, 1, 2)
        h = torch.relu(self.conv(h)).flatten(1)
        return self.lin2(torch.relu(self.lin1(h)))


def tiny_custom(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyNet:
    _seeded(seed)
    return _finish(TinyNet(), dtype)


def token_ids(batch: int = 2, length: int = 8, seed: int = 1, low: int = 2) -> torch.Tensor:
    """Random token ids in [low, VOCAB) from a private generator (does not touch the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=gen)


def _lm_inputs(batch: int = 2) -> dict:
    ids = token_ids(batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _t5_inputs(batch: int = 2) -> dict:
    ids = token_ids(batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": token_ids(batch, 5, 2)}


def _custom_inputs(batch: int = 2) -> dict:
    return {"input_ids": token_ids(batch, 16).reshape(batch, 4, 4)}


def model_output(out) -> torch.Tensor:
    """The tensor a test compares: `logits` of a transformers output, or the tensor itself."""
    return out.logits if hasattr(out, "logits") else out


@dataclass(frozen=True)
class TinyModelSpec:
    """How to build and feed one tiny model, and what LoRA targets by name on it."""

    build: Callable[..., nn.Module]
    inputs: Callable[..., dict]
    targets: tuple[str, ...]
    task_type: Optional[str] = None
    head: Optional[str] = None  # the module a classification task keeps trainable (modules_to_save)


TINY_MODELS: dict[str, TinyModelSpec] = {
    "llama": TinyModelSpec(tiny_llama, _lm_inputs, ("q_proj", "v_proj"), "CAUSAL_LM"),
    "gpt2": TinyModelSpec(tiny_gpt2, _lm_inputs, ("c_attn", "c_proj"), "CAUSAL_LM"),
    "bert": TinyModelSpec(tiny_bert_classifier, _lm_inputs, ("query", "value"), "SEQ_CLS", head="classifier"),
    "t5": TinyModelSpec(tiny_t5, _t5_inputs, ("q", "v"), "SEQ_2_SEQ_LM"),
    "custom": TinyModelSpec(tiny_custom, _custom_inputs, ("emb", "conv", "lin1")),
}
