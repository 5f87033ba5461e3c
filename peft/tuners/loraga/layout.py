"""Views of a LoRA layer's weight and factors as the paper's matrices: W and G as (m, n) = (out, in), A as (r, n),
B as (m, r), whatever the layer stores (Conv1D and Embedding transposed, Conv2d with a kernel)."""

from __future__ import annotations

import torch
from torch import nn

from ..lora.layer import LoraLayer


def _kind(layer: LoraLayer) -> str:
    base = layer.get_base_layer()
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, nn.Conv2d):
        return "conv2d"
    return "conv1d" if layer.fan_in_fan_out else "linear"


def to_matrix(stored: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored weight (or gradient) -> (m, n): Conv1D / Embedding transpose, Conv2d flattens the kernel."""
    if kind in ("conv1d", "embedding"):
        return stored.T
    if kind == "conv2d":
        return stored.flatten(1)
    return stored


def from_matrix(matrix: torch.Tensor, kind: str, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_matrix`: (m, n) -> the stored layout of `like`."""
    if kind in ("conv1d", "embedding"):
        return matrix.T.contiguous()
    return matrix.reshape(like.shape)


def factor_params(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored A and B tensors of `adapter_name` (Embedding: the ParameterDict entries)."""
    if adapter_name in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
