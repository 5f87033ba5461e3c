"""`VeraConfig`: the fields of a VeRA adapter (upstream PEFT's names, defaults and JSON form)."""

from __future__ import annotations

import math
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

_BIAS = ("none", "all", "vera_only")
_MODULE_NAMES = either(regex(), sequence_of(text(), "module name strings", into=set))


@dataclass
class VeraConfig(PeftConfig):
    """Vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv 2310.11454):
    `h = W x + Lambda_b B Lambda_d A x`, with `A` (r x max_in) and `B` (max_out x r) frozen random matrices shared
    by every adapted layer and `Lambda_d = diag(vera_lambda_d)` (r), `Lambda_b = diag(vera_lambda_b)` (out) trained
    per layer. A layer of shape (out, in) uses `A[:, :in]` and `B[:out, :]`.

    Args:
        r: rows of A / columns of B (VeRA uses far larger ranks than LoRA; default 256).
        target_modules: module names (dotted suffix), a regex (full match) or "all-linear"; Linear / Conv1D only.
        projection_prng_key: seed of the CPU generator that draws A then B (Kaiming-uniform); the same key, shapes
            and dtype give the same projections as upstream PEFT.
        save_projection: write A and B into the adapter file (`base_model.vera_A` / `base_model.vera_B`); without
            them, loading draws them again from `projection_prng_key`.
        vera_dropout: dropout on the adapter input. d_initial: initial value of every entry of `vera_lambda_d`.
        fan_in_fan_out: the base stores W as (in, out) (GPT-2's Conv1D). bias: "none", "all" or "vera_only".
        modules_to_save: modules trained whole. init_weights: True gives `vera_lambda_b = 0`, `vera_lambda_d =
            d_initial` (the wrapped model equals the base); False keeps the random init (ones / standard normal).
        layers_to_transform / layers_pattern: only adapt blocks with these indices (in `<pattern>.<index>.`).
    """

    r: int = field(default=256, metadata={"help": "Rank of the shared projections."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    projection_prng_key: int = field(default=0, metadata={"help": "Seed of the shared projections."})
    save_projection: bool = field(default=True, metadata={"help": "Save vera_A / vera_B with the adapter."})
    vera_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of vera_lambda_d."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out)."})
    bias: Literal["none", "all", "vera_only"] = field(default="none", metadata={"help": "Which biases train."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})
    init_weights: bool = field(default=True, metadata={"help": "lambda_b = 0, lambda_d = d_initial."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.VERA
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": integer(1),
        "target_modules": optional(_MODULE_NAMES),
        "projection_prng_key": Rule("an int (a torch.Generator seed)", integer(-(2**63)).convert),
        "save_projection": boolean(),
        "vera_dropout": number(0, 1, low_open=False),
        "d_initial": Rule("a finite number", number(-math.inf).convert),
        "fan_in_fan_out": boolean(),
        "bias": one_of(_BIAS),
        "modules_to_save": optional(sequence_of(text(), "module name strings")),
        "init_weights": boolean(),
        "layers_to_transform": optional(either(integer(0), sequence_of(integer(0), "ints >= 0"))),
        "layers_pattern": optional(either(text(), sequence_of(text(), "strings"))),
    }

    def _check_combinations(self) -> None:
        super()._check_combinations()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                             f"(got layers_pattern={self.layers_pattern!r}, layers_to_transform=None).")
