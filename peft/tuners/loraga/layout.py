"""Views of a LoRA layer's weight and factors as the paper's matrices: W and G as (m, n) = (out, in), A as (r, n),
B as (m, r), whatever the layer stores (Conv1D and Embedding transposed, Conv2d with a kernel); for LoRA on a bare
parameter (`ParamWrapper`, fused MoE experts) a stack of E such matrices, each expert initialised on its own."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..lora.layer import LoraLayer
from ..lora.param_wrapper import ParamWrapper, stack_factors
from .init_math import lora_ga_factors


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


# --- LoRA-GA on a stack (each expert is an m x n matrix) --------------------------------------------------------
def expert_matrices(stored: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A parameter (or its gradient) as `(E, m, n)` = (experts, out, in) matrices, whatever its stored layout."""
    if stored.ndim == 2:
        return stored.unsqueeze(0)
    return stored.transpose(1, 2) if transposed else stored


def loraga_stack_factors(grad: torch.Tensor, weight: Optional[torch.Tensor], r: int, scaling: float, options,
                         transposed: bool, compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's A, B for every expert from its own gradient G_e (m, n), in the stored layout `(E*r, n)`,
    `(m, r*E)`. `weight` (the parameter) is read for scale="weightS" only."""
    G = expert_matrices(grad, transposed)  # (E, m, n)
    W = expert_matrices(weight, transposed) if options.scale == "weightS" else None
    pairs = [lora_ga_factors(G[e], r, scaling, options.direction, options.scale, options.stable_gamma,
                             weight=None if W is None else W[e], compute_dtype=compute_dtype)
             for e in range(G.shape[0])]
    A_e = torch.stack([A for A, _ in pairs])  # (E, r, n)
    B_e = torch.stack([B for _, B in pairs])  # (E, m, r)
    return stack_factors(A_e, B_e)


def loraga_init(layer: ParamWrapper, adapter_name: str, grad: torch.Tensor, options, name: str) -> None:
    """Write LoRA-GA's A, B (one init per expert) into `adapter_name`'s factors; the base is offset separately
    (`subtract_adapter`)."""
    from .model import _DTYPES, stored_dtype

    param = layer.get_param()
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != tuple(param.shape):
        raise ValueError(f"The LoRA-GA gradient for target parameter {name!r} must be a dense tensor shaped like the "
                         f"parameter {tuple(param.shape)}; got {type(grad).__name__} "
                         f"{tuple(getattr(grad, 'shape', ()))} (the low_rank sketch does not cover target_parameters:"
                         " estimate without low_rank).")
    A, B = loraga_stack_factors(grad.to(param.device), param.detach(), layer.r[adapter_name],
                                layer.scaling[adapter_name], options, layer._is_transposed(), _DTYPES[options.dtype][0])
    with torch.no_grad():
        for target, value in ((layer.lora_A[adapter_name].weight, A), (layer.lora_B[adapter_name].weight, B)):
            dtype = stored_dtype(target, options)
            if target.dtype != dtype:
                target.data = target.data.to(dtype)
            target.copy_(value.to(dtype))


def subtract_adapter(layer: ParamWrapper, adapter_name: str) -> None:
    """`W <- W - s B A` per expert (LoRA-GA's offset), in fp32 from the factors as stored, W rounded once."""
    param = layer._writable_param()
    with torch.no_grad():
        new = param.data.to(torch.promote_types(param.dtype, torch.float32)) - layer._delta_fp32(adapter_name)
        param.data = new.to(param.dtype)
