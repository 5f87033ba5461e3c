"""`RankAllocator`: AdaLoRA's importance bookkeeping and triplet masking over the layers of one adapter.

The math is in `allocation.py`; this class only keeps the EMA state (per layer and factor) between steps and
applies masks to `lora_E`. Layers are found by the tuner model (a `{module path: AdaLoraLayer}` dict), never by
parameter-name substrings.
"""

from __future__ import annotations

from typing import Optional

import torch

from .allocation import budget_at, kept_triplets, smooth_importance, triplet_scores

FACTORS = ("lora_A", "lora_E", "lora_B")


def pattern_key(path: str, adapter_name: str) -> str:
    """The in-memory `rank_pattern` key of the layer at `path` (upstream's: `<path>.lora_E.<adapter>`)."""
    return f"{path}.lora_E.{adapter_name}"


def masks_by_path(rank_pattern: Optional[dict], adapter_name: str) -> dict[str, list[bool]]:
    """`{module path: keep mask}` from a rank pattern whose keys end in `.lora_E.<adapter>` (in memory) or `.lora_E`
    (as saved)."""
    out = {}
    for key, mask in (rank_pattern or {}).items():
        for suffix in (f".lora_E.{adapter_name}", ".lora_E"):
            if key.endswith(suffix):
                out[key[: -len(suffix)]] = list(mask)
                break
    return out


class RankAllocator:
    """Importance EMAs and budget masking for adapter `adapter_name` (config: an `AdaLoraConfig`)."""

    def __init__(self, layers: dict, config, adapter_name: str) -> None:
        self.config, self.adapter_name = config, adapter_name
        self.init_budget = sum(layer.r[adapter_name] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the importance EMAs (after the final mask)."""
        self.ipt_avg: dict[tuple[str, str], torch.Tensor] = {}
        self.unc_avg: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_at(step, self.init_budget, self.target_budget, c.tinit, c.tfinal, c.total_step, c.deltaT)

    def update_ipt(self, layers: dict) -> None:
        """One EMA step of every factor's sensitivity `|w * grad|` (a factor without a gradient counts as 0)."""
        with torch.no_grad():
            for path, layer in layers.items():
                for attr in FACTORS:
                    param = getattr(layer, attr)[self.adapter_name]
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    sensitivity = (param * grad).abs().float()
                    key = (path, attr)
                    ipt = self.ipt_avg.get(key, torch.zeros_like(sensitivity))
                    unc = self.unc_avg.get(key, torch.zeros_like(sensitivity))
                    self.ipt_avg[key], self.unc_avg[key] = smooth_importance(
                        ipt, unc, sensitivity, self.config.beta1, self.config.beta2)

    def _score(self, path: str, attr: str, like: torch.Tensor) -> torch.Tensor:
        key = (path, attr)
        if key not in self.ipt_avg:
            return torch.zeros(like.shape, device=like.device)
        return self.ipt_avg[key] * self.unc_avg[key]

    def mask_to_budget(self, layers: dict, budget: int) -> dict[str, list[bool]]:
        """Zero the `lora_E` entries of the least important triplets so that `budget` remain (over all layers);
        returns the rank pattern `{<path>.lora_E.<adapter>: keep mask}`."""
        paths = list(layers)
        scores = []
        for path in paths:
            a, e, b = (getattr(layers[path], attr)[self.adapter_name] for attr in FACTORS)
            score = triplet_scores(self._score(path, "lora_A", a), self._score(path, "lora_E", e),
                                   self._score(path, "lora_B", b))
            scores.append(score.to(scores[0].device) if scores else score)
        keeps = kept_triplets(scores, budget)
        pattern = {}
        with torch.no_grad():
            for path, keep in zip(paths, keeps):
                e = layers[path].lora_E[self.adapter_name]
                e.masked_fill_(~keep.to(e.device).reshape(-1, 1), 0.0)
                pattern[pattern_key(path, self.adapter_name)] = keep.tolist()
        return pattern

    def mask_using_rank_pattern(self, layers: dict, rank_pattern: dict) -> None:
        """Zero again the `lora_E` entries that `rank_pattern` masks (the optimizer may have moved them)."""
        masks = masks_by_path(rank_pattern, self.adapter_name)
        with torch.no_grad():
            for path, layer in layers.items():
                if path in masks:
                    e = layer.lora_E[self.adapter_name]
                    keep = torch.tensor(masks[path], dtype=torch.bool, device=e.device).reshape(-1, 1)
                    e.masked_fill_(~keep, 0.0)
