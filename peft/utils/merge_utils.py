"""Merging several task tensors (same shape) into one: task arithmetic, magnitude pruning, TIES and DARE.

Pure tensor functions (upstream's public names at upstream's import path). Notation: `T_i` are the task tensors,
`w_i` their weights (a 1-D tensor, one per task), `density` the share of entries kept by pruning (in [0, 1]).

- task arithmetic: `sum_i w_i T_i`.
- magnitude pruning: keep the `int(density * numel)` entries of largest |value|, zero the rest.
- random pruning (DARE, Yu et al. 2023): keep each entry with probability `density` (one Bernoulli draw per entry,
  in task order), optionally rescaled by `1 / density` so that the expectation is unchanged.
- TIES (Yadav et al. 2023): prune each task, elect a sign per entry from the *unweighted* pruned tasks ("total":
  sign of the sum; "frequency": sign of the sum of signs; ties go to +), then average the weighted entries that agree
  with the elected sign (dividing by their count, at least 1).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights` (k,) viewed as (k, 1, ..., 1) so it broadcasts against stacked tasks (k, *shape)."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `int(density * numel)` entries of largest magnitude."""
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    kept = torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices
    keep[kept] = 1
    return tensor * keep.view(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability `density` (Bernoulli mask); `rescale` divides the survivors by `density`."""
    mask = torch.bernoulli(torch.full_like(tensor, density))
    kept = tensor * mask
    return kept / density if rescale else kept


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False):
    """Prune `tensor` by `method`; density >= 1 keeps everything (with a warning), density < 0 is refused."""
    if density >= 1:
        warnings.warn(f"density={density} >= 1: nothing is pruned.")
        return tensor
    if density < 0:
        raise ValueError(f"Invalid density={density}: expected a value in [0, 1].")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Invalid pruning method={method!r}: expected 'magnitude' or 'random'.")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"):
    """Boolean mask (k, *shape): where each stacked task agrees with the elected per-entry sign (>= 0 elects +)."""
    signs = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = signs.sum(dim=0)
    else:
        raise RuntimeError(f"Invalid majority_sign_method={method!r}: expected 'total' or 'frequency'.")
    elected = torch.where(votes >= 0, 1, -1)
    return signs == elected


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the entries that agree with the elected sign (count clamped to >= 1)."""
    agreeing = (task_tensors * majority_sign_mask).sum(dim=0)
    count = majority_sign_mask.sum(dim=0).clamp(min=1.0)
    return agreeing / count


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stacked * reshape_weight_task_tensors(stacked, weights)).sum(dim=0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """`sum_i w_i T_i`."""
    return _weighted_sum(torch.stack(task_tensors, dim=0), weights)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """`sum_i w_i prune_magnitude(T_i)`."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _weighted_sum(torch.stack(pruned, dim=0), weights)


def _ties_merge(pruned: list[torch.Tensor], weights: torch.Tensor, method: str) -> torch.Tensor:
    stacked = torch.stack(pruned, dim=0)
    mask = calculate_majority_sign_mask(stacked, method=method)
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, weights), mask)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES: magnitude-prune, elect signs, disjoint mean of the weighted agreeing entries."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _ties_merge(pruned, weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: random-prune with rescale, then `sum_i w_i T_i'`."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _weighted_sum(torch.stack(pruned, dim=0), weights)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE pruning (rescaled) followed by TIES' sign election and disjoint mean."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _ties_merge(pruned, weights, majority_sign_method)


MERGERS = {
    "linear": lambda ts, w, density, sign: task_arithmetic(ts, w),
    "svd": lambda ts, w, density, sign: task_arithmetic(ts, w),
    "ties": lambda ts, w, density, sign: ties(ts, w, density, sign),
    "dare_linear": lambda ts, w, density, sign: dare_linear(ts, w, density),
    "dare_ties": lambda ts, w, density, sign: dare_ties(ts, w, density, sign),
    "magnitude_prune": lambda ts, w, density, sign: magnitude_prune(ts, w, density),
}
