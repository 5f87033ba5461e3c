"""Merge / unmerge for a tuner layer whose adapters add a weight-shaped delta (VeRA, Tied-LoRA).

The layer provides `_delta_fp32(name)`: the adapter's update as an (out, in) matrix in at least fp32, and
`fan_in_fan_out` (the base stores W as (in, out)). Merging adds the deltas to W in at least fp32 and rounds once.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class DeltaMergeMixin:
    """`merge`, `unmerge` and `get_delta_weight` from `_delta_fp32` (mixed into a `BaseTunerLayer`)."""

    fan_in_fan_out: bool = False

    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:  # (out, in)
        raise NotImplementedError

    def _stored(self, delta: torch.Tensor) -> torch.Tensor:
        """An (out, in) matrix in the layout of the stored base weight."""
        return delta.T if self.fan_in_fan_out else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's update shaped like the stored base weight, in the base weight's dtype."""
        return self._stored(self._delta_fp32(adapter_name)).to(self.get_base_layer().weight.dtype)

    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        known = self._all_available_adapter_names()
        names = [n for n in names if n in known and n not in self.merged_adapters]
        if self.merged and not names:
            warnings.warn("All adapters are already merged, nothing to do.")
        return names

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each named (default: active) adapter's delta to the base weight, rounding once. With `safe_merge`, a
        non-finite result raises ValueError and nothing changes."""
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        base = self.get_base_layer()
        weight = _at_least_fp32(base.weight.detach())
        for name in names:
            weight = weight + self._stored(self._delta_fp32(name)).to(weight)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"Merging adapters {names} gives NaN/Inf in the base weight (NaNs detected in the merged "
                             "weights); nothing merged.")
        base.weight.data = weight.to(base.weight.dtype)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta again (the inverse of `merge`), rounding once."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        weight = _at_least_fp32(base.weight.detach())
        for name in reversed(self.merged_adapters):
            weight = weight - self._stored(self._delta_fp32(name)).to(weight)
        base.weight.data = weight.to(base.weight.dtype)
        self.merged_adapters.clear()
