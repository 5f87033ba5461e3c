"""`LoraModel.add_weighted_adapter`: a new LoRA adapter built from a weighted combination of existing ones.

Every layer is handled in the "B @ A" orientation: A (r, n) and B (m, r) as matrices (a conv kernel flattened to
(r, c_in*kh*kw) / (c_out, r); an embedding's A is (r, num_embeddings)), so that the update is `s * B @ A`.

Combination types (upstream's names):
- "cat": `A' = [w_1 s_1 A_1; ...]`, `B' = [B_1, ...]`, so `B' A' = sum_i w_i s_i B_i A_i` exactly (rank sum r_i).
- "svd" and "<merge>_svd": merge the full updates `D_i = s_i B_i A_i` (task arithmetic, TIES, DARE or magnitude
  pruning, see `peft.utils.merge_utils`), then keep the best rank-k approximation (truncated SVD, Eckart-Young):
  `B' = U_k S_k`, `A' = V_k^T`, optionally clamped to a quantile of their entries.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": merge the factors themselves, A with weights
  `sign(c_i) sqrt|c_i|` and B with `sqrt|c_i|`, `c_i = w_i s_i` (needs equal ranks; "linear" equals the weighted
  sum only when the adapters share their factors, an approximation otherwise).

The new adapter has `r = lora_alpha = new rank`; the factors are divided by its scale so `s' B' A'` is the result.
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from functools import reduce
from typing import Optional

import torch

from ...utils.merge_utils import MERGERS
from ...utils.other import ModulesToSaveWrapper
from .layer import LoraLayer

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat",) + FACTOR_TYPES + SVD_TYPES
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# --- pure math --------------------------------------------------------------------------------------------------
def cat_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], coefficients: list[float]):
    """[(A_i (r_i, n), B_i (m, r_i))], c_i -> A' (sum r_i, n), B' (m, sum r_i) with `B' A' = sum c_i B_i A_i`."""
    A = torch.cat([c * A_i for (A_i, _), c in zip(factors, coefficients)], dim=0)
    B = torch.cat([B_i for _, B_i in factors], dim=1)
    return A, B


def merge_full(deltas: list[torch.Tensor], weights: list[float], merge: str, density, sign_method) -> torch.Tensor:
    """`deltas` (each (m, n)) combined by `merge` ("svd" = task arithmetic, or a merge_utils method)."""
    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)
    return MERGERS[merge](deltas, w, density, sign_method)


def low_rank_factors(delta: torch.Tensor, rank: int, clamp: Optional[float] = None, full_matrices: bool = True,
                     driver: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factorisation of `delta` (m, n): A = V_k^T (k, n), B = U_k S_k (m, k); `clamp` in [0, 1]
    clips both to +-(that quantile of their entries). k = min(rank, m, n); fewer rows are zero-padded to `rank`."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.numel())
    B, A = U[:, :k] * S[:k], Vh[:k]
    if clamp is not None:
        bound = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-bound, bound), A.clamp(-bound, bound)
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B


def merge_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], coefficients: list[float], merge: str,
                  density, sign_method) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge A's with `sign(c) sqrt|c|` and B's with `sqrt|c|` (the sign on one side only)."""
    roots = [math.sqrt(abs(c)) for c in coefficients]
    signed = [r if c >= 0 else -r for r, c in zip(roots, coefficients)]
    A = merge_full([A_i for A_i, _ in factors], signed, merge, density, sign_method)
    B = merge_full([B_i for _, B_i in factors], roots, merge, density, sign_method)
    return A, B


# --- layer access -----------------------------------------------------------------------------------------------
def _factor_params(layer: LoraLayer, name: str):
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return A.detach().flatten(1), B.detach().flatten(1)  # (r, n), (m, r)


def _combine_layer(layer: LoraLayer, new: str, adapters, weights, kind: str, options: dict) -> None:
    target_A, target_B = _factor_params(layer, new)
    present = [(a, w) for a, w in zip(adapters, weights) if _factor_params(layer, a) is not None]
    if not present:
        return
    work = torch.promote_types(target_A.dtype, torch.float32)
    factors = [tuple(t.to(work) for t in _as_matrices(*_factor_params(layer, a))) for a, _ in present]
    coefficients = [w * layer.scaling[a] for a, w in present]
    if kind == "cat":
        A, B = cat_factors(factors, coefficients)
    elif kind in SVD_TYPES:
        deltas = [B_i @ A_i * layer.scaling[a] for (A_i, B_i), (a, _) in zip(factors, present)]
        merged = merge_full(deltas, [w for _, w in present], kind.removesuffix("_svd"), options["density"],
                            options["majority_sign_method"])
        A, B = low_rank_factors(merged, target_A.shape[0], options["svd_clamp"], options["svd_full_matrices"],
                                options["svd_driver"])
    else:
        A, B = merge_factors(factors, coefficients, kind, options["density"], options["majority_sign_method"])
    scale = layer.scaling[new]
    A = A / scale
    rows, cols = A.shape[0], B.shape[1]
    with torch.no_grad():
        target_A.zero_()
        target_B.zero_()
        target_A.view(target_A.shape[0], -1)[:rows] = A.to(target_A.dtype)
        target_B.view(target_B.shape[0], -1)[:, :cols] = B.to(target_B.dtype)


# --- checks -----------------------------------------------------------------------------------------------------
def _max_rank(config) -> int:
    return max([config.r, *(config.rank_pattern or {}).values()])


def plan(model, adapters: list[str], weights: list[float], combination_type: str, svd_rank, density):
    """Validate the request; returns (combination type, new rank, new target_modules)."""
    if not adapters:
        raise ValueError("Invalid adapters=[]: expected at least one adapter name.")
    for name in adapters:
        if name not in model.peft_config:
            raise ValueError(f"Adapter {name!r} does not exist; known adapters: {sorted(model.peft_config)}.")
    if len(weights) != len(adapters):
        raise ValueError(f"Invalid weights={list(weights)}: expected one weight per adapter ({len(adapters)}).")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type={combination_type!r}: expected one of {COMBINATION_TYPES}.")
    shared = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)
              and sum(a in m.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError(f"Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {len(shared)} such instance(s). One whole-module copy per adapter cannot be combined.")
    kind = "linear" if len(adapters) == 1 else combination_type
    ranks = [_max_rank(model.peft_config[a]) for a in adapters]
    if kind in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(f"All adapters must have the same r value when using combination_type {kind!r} (got "
                             f"{dict(zip(adapters, ranks))}); use 'cat' or 'svd' for different ranks.")
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ValueError(f"Invalid svd_rank={svd_rank!r}: expected a positive int or None.")
        new_rank = svd_rank or max(ranks)
    if kind.removesuffix("_svd") in _NEEDS_DENSITY and (density is None or not 0 <= density <= 1):
        raise ValueError(f"Invalid density={density!r} for combination_type {kind!r}: expected a value in [0, 1].")
    return kind, new_rank, _union_targets([model.peft_config[a].target_modules for a in adapters])


def _union_targets(targets: list):
    kinds = {type(t) for t in targets}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type: combining adapters whose "
                         f"target_modules mix a regex string and a list/set is not supported (got {targets}).")
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return reduce(operator.or_, (set(t) for t in targets))


def add_weighted_adapter(
    model, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
    svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None, density: Optional[float] = None, majority_sign_method: str = "total",
) -> None:
    """Add `adapter_name` to the LoraModel `model`, combining `adapters` with `weights` (see the module docstring).
    An existing `adapter_name` is left as it is (upstream's behaviour). The new adapter is frozen, not activated."""
    if adapter_name in model.peft_config:
        return
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"Invalid majority_sign_method={majority_sign_method!r}: expected 'total' or 'frequency'.")
    kind, new_rank, targets = plan(model, list(adapters), list(weights), combination_type, svd_rank, density)
    source = model.peft_config[adapters[0]]
    init = source.init_lora_weights if source.init_lora_weights in (True, False, "gaussian") else True
    model.peft_config[adapter_name] = replace(source, r=new_rank, lora_alpha=new_rank, target_modules=targets,
                                              alpha_pattern={}, rank_pattern={}, init_lora_weights=init)
    try:
        model.inject_adapter(model.model, adapter_name)
    except Exception:
        del model.peft_config[adapter_name]
        raise
    for name, param in model.model.named_parameters():
        if f".{adapter_name}." in f".{name}." and model.prefix in name:
            param.requires_grad_(False)
    options = dict(svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                   majority_sign_method=majority_sign_method)
    for _, layer in model.tuner_layers():
        if isinstance(layer, LoraLayer) and _factor_params(layer, adapter_name) is not None:
            _combine_layer(layer, adapter_name, list(adapters), list(weights), kind, options)
