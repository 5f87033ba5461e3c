"""The seed API: `AdamWLoRAPro(params, lr, weight_decay, T_max, scaling_factor)`, as the community port's README
(laihongphuc/lora_pro) builds it, over any LoRA model (`LoraConfig` or `LoraProConfig`). A seed user changes one
line, `from lora_pro import AdamWLoRAPro` -> `from peft.optimizers import AdamWLoRAPro`."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from .lorapro import LoraProAdamW
from .pairs import LoraProPair, pairs_from_parameters


def seed_cosine_scale(step: int, T_max: int) -> float:
    """The seed port's in-optimizer schedule: cosine from 1 to 0 over `T_max` steps, then restarts with the
    period doubled (T_max, 2 T_max, 4 T_max, ...): `0.5 + 0.5 cos(pi k / period)`, k the step within the period."""
    k, period = step - 1, T_max
    while k >= period:
        k -= period
        period *= 2
    return 0.5 + 0.5 * math.cos(math.pi * k / period)


def _check_scaling_factor(pairs: list[LoraProPair], scaling_factor: float) -> None:
    """Refuse a `scaling_factor` that is not every layer's s: in the seed it enters the math, and the W-step it
    gives scales with s / scaling_factor, so a mismatch means a run other than the one the user configured."""
    for pair in pairs:
        if not math.isclose(pair.scaling, scaling_factor, rel_tol=1e-6):
            raise ValueError(
                f"scaling_factor={scaling_factor!r} disagrees with the scale s={pair.scaling!r} of LoRA adapter "
                f"{pair.adapter_name!r} (lora_alpha / r, or / sqrt(r) with rsLoRA); s is read from the layers, pass "
                "scaling_factor=None or the right value."
            )


class AdamWLoRAPro(LoraProAdamW):
    """The seed API: a `LoraProAdamW` over the LoRA factors in `params`, paired by the LoRA layers that own them
    (LoRA-Pro layers, or the plain LoRA layers of a `LoraConfig` model).

    Args:
        params: LoRA A/B parameters (e.g. `[p for n, p in model.named_parameters() if "classifier" not in n]`).
            Frozen ones are skipped; a trainable parameter no LoRA layer owns, or whose partner is missing, is an
            error.
        lr, weight_decay: as the seed (defaults 1e-3 and 0.01).
        T_max: None (default) leaves the learning rate to the caller (a torch scheduler). An int turns on the
            seed's built-in schedule, `lr * (0.5 + 0.5 cos(pi k / period))` with warm restarts whose period starts
            at `T_max` steps and doubles at each restart (`seed_cosine_scale`; the seed's default was 1000). Do not
            combine it with a scheduler.
        scaling_factor: the LoRA scale s the caller believes the layers use (the seed's default was 2.0); None skips
            the check. s is always read from each layer (rsLoRA included); a value that disagrees with a layer's s
            is a ValueError (see `_check_scaling_factor`).
        betas, eps, mode, x_mode, damping, nonfinite: as `LoraProAdamW`.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float = 1e-3, weight_decay: float = 0.01,
        T_max: Optional[int] = None, scaling_factor: Optional[float] = None, *,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, mode: Optional[str] = None,
        x_mode: Optional[str] = None, damping: Optional[float] = None, nonfinite: str = "raise",
    ) -> None:
        if T_max is not None and (not isinstance(T_max, int) or isinstance(T_max, bool) or T_max < 1):
            raise ValueError(f"Invalid T_max={T_max!r}: expected None or a positive int (steps).")
        pairs = pairs_from_parameters(params)
        if scaling_factor is not None:
            _check_scaling_factor(pairs, scaling_factor)
        self._setup(pairs, [], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode,
                                    x_mode=x_mode, damping=damping, T_max=T_max), nonfinite)

    def _lr_scale(self, step: int, group: dict) -> float:
        return 1.0 if group.get("T_max") is None else seed_cosine_scale(step, group["T_max"])


AdamWLoraPro = AdamWLoRAPro  # the name the seed package itself exports (its README spells it AdamWLoRAPro)
