"""`KronAConfig`: the fields of a KronA adapter (Kronecker adapter, Edalati et al. 2022) and what each accepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from ...config import PeftConfig
from ...utils.config_validation import (
    Refused,
    Rule,
    boolean,
    either,
    integer,
    number,
    one_of,
    optional,
    pattern_dict,
    regex,
    sequence_of,
    text,
)
from ...utils.peft_types import PeftType

_MODULE_NAMES = either(regex(), sequence_of(text(), "module name strings", into=set))
_INITS = (True, False, "a_zero")


def _factor_spec(value):
    """A positive int d (A is d x d) or a pair [a1, a2] of positive ints; stored as an int or a list."""
    if isinstance(value, bool):
        raise Refused("a bool is not a factor size")
    if isinstance(value, int):
        if value < 1:
            raise Refused()
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return [int(v) for v in value]
    raise Refused()


_FACTOR = Rule("a positive int d (A is d x d) or a pair [a1, a2] of positive ints (A is a1 x a2)", _factor_spec)


@dataclass
class KronAConfig(PeftConfig):
    """KronA: `W' = W + s * kron(A, B)`, A of shape (a1, a2), B of shape (out/a1, in/a2) (arXiv 2212.10650).

    Args:
        krona_dim: the shape of A for every adapted layer: None picks a1, a2 as the divisors of out / in nearest
            their square roots (fewest parameters), an int d means (d, d), a pair means (a1, a2). a1 must divide
            out_features and a2 in_features (checked per layer, ValueError naming the module).
        krona_dim_pattern: per-module krona_dim (regex on a dotted suffix of the module name -> int or [a1, a2]).
        krona_scale: s, the constant scale of the update. krona_dropout: dropout on the adapter's input.
        init_weights: True (A Kaiming-uniform, B zero: the output is unchanged at init), "a_zero" (A zero, B
            Kaiming-uniform: also unchanged), False (both random: the output changes; for tests).
        target_modules / exclude_modules / layers_to_transform / layers_pattern: as in `LoraConfig`.
        fan_in_fan_out: the base stores W as (in, out) (GPT-2's Conv1D; set automatically for it).
        bias: "none", "all" or "krona_only". modules_to_save: modules trained whole and saved.
    """

    krona_dim: Optional[Union[int, list[int]]] = field(default=None, metadata={"help": "Shape of A: d or [a1, a2]."})
    krona_dim_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module krona_dim (regex -> dim)."})
    krona_scale: float = field(default=1.0, metadata={"help": "Scale s of kron(A, B)."})
    krona_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapt these."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out)."})
    bias: Literal["none", "all", "krona_only"] = field(default="none", metadata={"help": "Which biases train."})
    init_weights: Union[bool, str] = field(default=True, metadata={"help": "True, 'a_zero' or False."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.KRONA
    field_rules: ClassVar[dict[str, Rule]] = {
        "krona_dim": optional(_FACTOR),
        "krona_dim_pattern": optional(pattern_dict(_FACTOR)),
        "krona_scale": number(-float("inf"), low_open=True),
        "krona_dropout": number(0, 1, low_open=False),
        "target_modules": optional(_MODULE_NAMES),
        "exclude_modules": optional(_MODULE_NAMES),
        "layers_to_transform": optional(either(integer(0), sequence_of(integer(0), "ints >= 0"))),
        "layers_pattern": optional(either(text(), sequence_of(text(), "strings"))),
        "fan_in_fan_out": boolean(),
        "bias": one_of(("none", "all", "krona_only")),
        "init_weights": one_of(_INITS),
        "modules_to_save": optional(sequence_of(text(), "module name strings")),
    }

    def _check_combinations(self) -> None:
        super()._check_combinations()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"Invalid layers_pattern={self.layers_pattern!r}: expected layers_to_transform to be "
                             "set as well.")
