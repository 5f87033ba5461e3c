"""LoRA around `nn.Embedding`: `E' = E + s (B A)^T`, A (r x num_embeddings), B (embedding_dim x r)."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .dora import dora_factor, dora_output
from .functional import delta_weight
from .layer import LoraLayer
from .mixed_batch import mixed_forward


class Embedding(nn.Module, LoraLayer):
    """Looks up rows of A^T and maps them through B^T; stored as `lora_embedding_A` / `lora_embedding_B`."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
        use_dora: bool = False, lora_bias: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          use_dora=use_dora, lora_bias=lora_bias)

    supports_lora_bias = False

    def _make_factors(self, adapter_name: str, r: int) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        """True / "gaussian": A zero, B standard normal (the update starts at zero); False: both random."""
        if init_lora_weights is False or adapter_name not in self.lora_embedding_A:
            return
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        A, B = self._factors(adapter_name)
        return delta_weight(A, B, self.scaling[adapter_name], fan_in_fan_out=True)  # (num_embeddings, dim)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._delta_fp32(adapter_name).to(self.get_base_layer().weight.dtype)

    def _output_major(self, weight: torch.Tensor) -> torch.Tensor:
        """(num_embeddings, dim) <-> (dim, num_embeddings): DoRA's output channel is the embedding dim."""
        return weight.T

    def _embedding_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`s * B A^T[x]` (..., dim): the rows of A^T that `x` looks up, through B^T."""
        base, (A, B) = self.get_base_layer(), self._factors(name)
        rows = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)  # (..., r)
        return (rows @ B.T) * self.scaling[name]

    supports_mixed_batch = True  # `adapter_names=[...]`: one adapter per sample (see .mixed_batch)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if "adapter_names" in kwargs:
            return mixed_forward(self, x, kwargs.pop("adapter_names"), *args, **kwargs)
        result = self._base_forward(x, *args, **kwargs)
        names = self._lora_active()
        if not names:
            return result
        out_dtype = result.dtype
        for name in names:
            lora_out = self._embedding_branch(name, x)
            if self.use_dora.get(name):  # f * (E + dE)[x] = result + (f - 1) * result + f * dE[x]; no dropout
                factor = dora_factor(self.lora_magnitude_vector[name].weight, self._dora_norm(name))
                result = dora_output(result, result, lora_out, factor, channel_dim=-1)
            else:
                result = result + lora_out
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
