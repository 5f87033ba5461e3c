"""Fields shared by the LyCORIS-family configs (LoHa, LoKr): upstream's names, defaults and JSON form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from ...config import PeftConfig
from ...utils.config_validation import (
    Rule,
    boolean,
    either,
    integer,
    number,
    optional,
    pattern_dict,
    regex,
    sequence_of,
    text,
)

MODULE_NAMES = either(regex(), sequence_of(text(), "module name strings", into=set))
PROBABILITY = number(0, 1, low_open=False, high_open=False)


@dataclass
class LycorisCommonConfig(PeftConfig):
    """What every LyCORIS-style adapter (a structured `delta W` added to a Linear / Conv weight) is configured by.

    Args:
        r: rank of the low-rank factors. alpha: numerator of the scale `alpha / r`.
        rank_dropout: while training, each output row of `delta W` is dropped with this probability.
        module_dropout: while training, the whole adapter of a layer is skipped with this probability.
        use_effective_conv2d: for convolutions with a kernel larger than 1, factor the kernel with a small core
            tensor (FedPara's Proposition 3) instead of flattening it into the input dimension.
        target_modules / exclude_modules: module names (dotted suffix), a regex (full match), or "all-linear".
        init_weights: True keeps the model's output unchanged at creation; False draws every factor at random.
        layers_to_transform / layers_pattern: only adapt blocks with these indices.
        rank_pattern / alpha_pattern: per-module `r` / `alpha`, keys are regexes on a dotted suffix of the name.
        modules_to_save: modules trained whole and saved with the adapter.
    """

    r: int = field(default=8, metadata={"help": "Rank of the factors."})
    alpha: float = field(default=8, metadata={"help": "Scale numerator: delta W is multiplied by alpha / r."})
    rank_dropout: float = field(default=0.0, metadata={"help": "Drop probability of an output row of delta W."})
    module_dropout: float = field(default=0.0, metadata={"help": "Probability of skipping a layer's adapter."})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "Core-tensor factorisation of conv kernels."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapt these."})
    init_weights: bool = field(default=True, metadata={"help": "True: output unchanged at creation."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module rank (regex -> r)."})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module alpha (regex -> alpha)."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})

    field_rules: ClassVar[dict[str, Rule]] = {
        "r": integer(1),
        "alpha": number(0, low_open=False),
        "rank_dropout": PROBABILITY,
        "module_dropout": PROBABILITY,
        "use_effective_conv2d": boolean(),
        "target_modules": optional(MODULE_NAMES),
        "exclude_modules": optional(MODULE_NAMES),
        "init_weights": boolean(),
        "layers_to_transform": optional(either(integer(0), sequence_of(integer(0), "ints >= 0"))),
        "layers_pattern": optional(either(text(), sequence_of(text(), "strings"))),
        "rank_pattern": optional(pattern_dict(integer(1))),
        "alpha_pattern": optional(pattern_dict(number(0, low_open=False))),
        "modules_to_save": optional(sequence_of(text(), "module name strings")),
    }

    def _check_combinations(self) -> None:
        super()._check_combinations()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                             f"(got layers_pattern={self.layers_pattern!r}, layers_to_transform=None).")
