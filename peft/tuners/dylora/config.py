"""`DyLoRAConfig`: the fields of a DyLoRA adapter (Valipour et al., EACL 2023) and what each accepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from ...config import PeftConfig
from ...utils.config_validation import (
    Rule,
    boolean,
    either,
    integer,
    number,
    one_of,
    optional,
    regex,
    sequence_of,
    text,
)
from ...utils.peft_types import PeftType
from .rank_math import UPDATE_MODES

_MODULE_NAMES = either(regex(), sequence_of(text(), "module name strings", into=set))


@dataclass
class DyLoRAConfig(PeftConfig):
    """DyLoRA: LoRA factors `A` (r x in), `B` (out x r) trained so that every truncation to rank `b <= r` works.

    Training (the layers in train mode): each step samples `b ~ U{r_min, ..., r}` (the paper's uniform p_B), shared
    by all layers of the adapter, and computes `W0 x + (lora_alpha / b) B[:, :b] A[:b] x`. Evaluation and merging
    use `eval_rank` (None: r), changed later with `model.base_model.set_rank(b)`.

    Args:
        r: the largest rank. r_min: the smallest sampled rank (1 <= r_min <= r). lora_alpha: scale numerator.
        update_mode: "frozen" (the paper's Algorithm 1: only the b-th row of A / column of B gets a gradient; at
            b == r_min the first r_min rows) or "all" (every row up to b).
        fixed_scale: scale every truncation by `lora_alpha / r` instead of the paper's `lora_alpha / b` (with
            `alpha / b` a component's weight changes with b, so the truncations can only share a compromise).
        eval_rank: the rank used outside training and by merge (1 <= eval_rank <= r; None means r).
        rank_seed: seed of the rank sampler (None: drawn from torch's global RNG, so torch.manual_seed fixes it).
        lora_dropout, target_modules, exclude_modules, layers_to_transform, layers_pattern, fan_in_fan_out,
        modules_to_save: as in `LoraConfig`. bias: "none", "all" or "dylora_only".
        init_lora_weights: True (A Kaiming-uniform, B zero: output unchanged), "gaussian" (A ~ N(0, 1/r^2), B zero),
            False (B random too).
    """

    r: int = field(default=8, metadata={"help": "Largest rank."})
    r_min: int = field(default=1, metadata={"help": "Smallest sampled rank."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: the update is (alpha / b) B_b A_b."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    update_mode: Literal["frozen", "all"] = field(default="frozen", metadata={"help": "'frozen' or 'all'."})
    fixed_scale: bool = field(default=False, metadata={"help": "Scale every truncation by alpha / r (not alpha / b)."})
    eval_rank: Optional[int] = field(default=None, metadata={"help": "Rank for eval / merge (None: r)."})
    rank_seed: Optional[int] = field(default=None, metadata={"help": "Seed of the rank sampler."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapt these."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out)."})
    bias: Literal["none", "all", "dylora_only"] = field(default="none", metadata={"help": "Which biases train."})
    init_lora_weights: Union[bool, str] = field(default=True, metadata={"help": "True, False or 'gaussian'."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.DYLORA
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": integer(1),
        "r_min": integer(1),
        "lora_alpha": number(0),
        "lora_dropout": number(0, 1, low_open=False),
        "update_mode": one_of(UPDATE_MODES),
        "fixed_scale": boolean(),
        "eval_rank": optional(integer(1)),
        "rank_seed": optional(integer(0)),
        "target_modules": optional(_MODULE_NAMES),
        "exclude_modules": optional(_MODULE_NAMES),
        "layers_to_transform": optional(either(integer(0), sequence_of(integer(0), "ints >= 0"))),
        "layers_pattern": optional(either(text(), sequence_of(text(), "strings"))),
        "fan_in_fan_out": boolean(),
        "bias": one_of(("none", "all", "dylora_only")),
        "init_lora_weights": one_of((True, False, "gaussian")),
        "modules_to_save": optional(sequence_of(text(), "module name strings")),
    }

    def _check_combinations(self) -> None:
        super()._check_combinations()
        if self.r_min > self.r:
            raise ValueError(f"Invalid r_min={self.r_min}: expected 1 <= r_min <= r={self.r}.")
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise ValueError(f"Invalid eval_rank={self.eval_rank}: expected 1 <= eval_rank <= r={self.r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"Invalid layers_pattern={self.layers_pattern!r}: expected layers_to_transform to be "
                             "set as well.")
