"""`AdaLoraConfig`: AdaLoRA's fields (Zhang et al., ICLR 2023) on top of LoRA's, with upstream's names and JSON form."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ...utils.config_validation import Refused, Rule, integer, is_int, number, one_of, optional
from ...utils.peft_types import PeftType
from ..lora.config import LoraConfig


def _rank_masks(value):
    """`rank_pattern` as the allocator writes it: `{"<module path>.lora_E[.<adapter>]": [bool, ...]}` (which of the
    layer's `init_r` triplets are kept); lists of 0/1 are read as bools."""
    if not isinstance(value, dict):
        raise Refused()
    result = {}
    for key, mask in value.items():
        if not isinstance(key, str) or not key:
            raise Refused(f"key {key!r} is not a non-empty string")
        if not isinstance(mask, (list, tuple)) or not all(isinstance(b, bool) or b in (0, 1) for b in mask):
            raise Refused(where=f"[{key!r}]", value=mask, expected="a list of bools (kept triplets)")
        result[key] = [bool(b) for b in mask]
    return result


_RANK_MASKS = Rule("a dict from '<module>.lora_E' to a list of bools", _rank_masks)


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: an SVD-form update `W' = W + B diag(E) A * lora_alpha / (ranknum + 1e-5)` whose rank budget is
    moved between layers during training (paper section 3.1; see `peft.tuners.adalora.allocation`).

    Training has three phases over `total_step` steps: `tinit` warm-up steps at the full budget `init_r * n` (n
    adapted matrices); the budget then falls on a cubic schedule to `target_r * n` at step `total_step - tfinal`,
    the least important triplets being masked every `deltaT` steps; the last `tfinal` steps keep the final mask.

    Args:
        target_r: average rank per matrix at the end. init_r: rank each matrix starts with.
        tinit / tfinal: warm-up and final steps without budget change. deltaT: steps between two maskings.
        beta1 / beta2: EMA factors of the sensitivity and of its uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonality penalty added to `outputs.loss` in training forward passes.
        total_step: number of training steps (required, > 0).
        rank_pattern: written by the allocator: kept triplets per layer; a saved adapter reloads at these ranks.

    `r` is not used (`init_r` is); DoRA, LoftQ, rsLoRA, `alpha_pattern`, `lora_bias`, `target_parameters` and the
    data-driven inits are refused.
    """

    target_r: int = field(default=8, metadata={"help": "Target average rank per matrix."})
    init_r: int = field(default=12, metadata={"help": "Initial rank per matrix."})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps at the full budget."})
    tfinal: int = field(default=0, metadata={"help": "Final steps with the final mask."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonality penalty."})
    total_step: Optional[int] = field(default=None, metadata={"help": "Total training steps (required)."})
    rank_pattern: Optional[dict] = field(default=None, metadata={"help": "Kept triplets per layer (allocator)."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.ADALORA
    field_rules: ClassVar[dict[str, Rule]] = {
        "target_r": integer(0),
        "init_r": integer(0),
        "tinit": integer(0),
        "tfinal": integer(0),
        "deltaT": integer(1),
        "beta1": number(0, 1),
        "beta2": number(0, 1),
        "orth_reg_weight": number(0, low_open=False),
        "total_step": optional(integer(1)),
        "rank_pattern": optional(_RANK_MASKS),
        "init_lora_weights": one_of((True, False, "gaussian")),
        # "adalora_only" (the `<method>_only` form upstream also accepts) means the same as "lora_only"
        "bias": one_of(("none", "all", "lora_only", "adalora_only")),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r != 8:  # LoraConfig's default
            warnings.warn(f"AdaLoRA ignores r={self.r}: every layer starts at init_r={self.init_r}; set init_r for "
                          "the initial rank.")

    def _check_combinations(self) -> None:
        super()._check_combinations()
        refused = {"use_dora": self.use_dora, "lora_bias": self.lora_bias, "use_rslora": self.use_rslora,
                   "loftq_config": bool(self.loftq_config), "alpha_pattern": bool(self.alpha_pattern),
                   "target_parameters": bool(self.target_parameters), "lora_ga_config": self.lora_ga_config is not None}
        for name, used in refused.items():
            if used:
                raise ValueError(f"Invalid {name}={getattr(self, name)!r}: AdaLoRA does not support it (its update is "
                                 "B diag(E) A scaled by lora_alpha / ranknum); expected the default.")
        if not is_int(self.total_step) or self.total_step <= 0:
            raise ValueError(f"Invalid total_step={self.total_step!r}: AdaLoRA needs the number of training steps, "
                             "expected an int > 0.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"Invalid tinit={self.tinit}, tfinal={self.tfinal} for total_step={self.total_step}: "
                             "expected tinit < total_step - tfinal (a budgeting phase of at least one step).")
        if self.target_r > self.init_r:
            raise ValueError(f"Invalid target_r={self.target_r}: expected at most init_r={self.init_r} (the budget "
                             "only shrinks).")
