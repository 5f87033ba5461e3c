"""The rows a trainable-tokens adapter trains: per adapter, new values for a few rows of an embedding matrix.

For an embedding `E` (num_embeddings x dim), token ids `t_1..t_k` and trained rows `D` (k x dim), the adapter's
matrix is `E'` with `E'[t_i] = D[i]` and `E'[j] = E[j]` for every other row. The stored tensor holds the new rows
themselves, not a difference (upstream's `trainable_tokens_delta`); it starts as a copy of `E[t]`, so the model is
unchanged at init, and only those k rows receive gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RowBuffers(nn.Module):
    """Per-adapter tensors kept as non-persistent buffers: they move with `.to()` but stay out of `state_dict`."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()


def delta_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 rows for a half-precision base (stable optimizer steps), else the base dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class TrainableTokensLayer(nn.Module):
    """`token_adapter` of a `TrainableTokensWrapper`: the wrapped `base_layer` and, per adapter,
    `token_indices[name]` (list of k ids), `trainable_tokens_delta[name]` (k x dim, trained) and
    `trainable_tokens_original[name]` (k x dim, the base rows, for unmerging; not saved).

    A wrapper tied to another one (an output layer sharing the input embedding's weight) keeps its own
    `base_layer` here and reads the rows from the other wrapper's layer.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict({})
        self.trainable_tokens_original = RowBuffers()
        self.token_indices: dict[str, list[int]] = {}

    def add_rows(self, adapter_name: str, token_indices: Sequence[int]) -> None:
        """Start adapter `adapter_name` with a copy of the base rows `token_indices`."""
        weight = self.base_layer.weight
        ids = [int(i) for i in token_indices]
        bad = [i for i in ids if not 0 <= i < weight.shape[0]]
        if bad:
            raise ValueError(f"trainable_token_indices {bad} are out of range for an embedding of {weight.shape[0]} "
                             f"rows ({type(self.base_layer).__name__}); expected ids in [0, {weight.shape[0]}).")
        with torch.no_grad():
            original = weight[torch.tensor(ids, device=weight.device)].detach().clone()  # (k, dim)
        self.token_indices[adapter_name] = ids
        self.trainable_tokens_original[adapter_name] = original
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(original.to(delta_dtype(weight), copy=True))

    def index(self, adapter_name: str) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter_name], dtype=torch.long)

    def rows(self, adapter_names: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(index, new rows)` of each named adapter that has rows here."""
        return [(self.index(n), self.trainable_tokens_delta[n]) for n in adapter_names if n in self.token_indices]

    def originals(self, adapter_names: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.index(n), self.trainable_tokens_original[n]) for n in adapter_names if n in self.token_indices]
