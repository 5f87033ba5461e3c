"""`LoKrConfig`: upstream's LoKr fields and defaults (shared ones: see `LycorisCommonConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from ...utils.config_validation import Refused, Rule, boolean, is_int, one_of
from ...utils.peft_types import PeftType
from ..lycoris_common.config import LycorisCommonConfig


def _factor(value):
    if not is_int(value) or not (value == -1 or value >= 1):
        raise Refused()
    return int(value)


@dataclass
class LoKrConfig(LycorisCommonConfig):
    """Low-rank Kronecker product (LyCORIS; Yeh et al. 2024, arXiv 2309.14859):
    `delta W = (alpha / r) * W1 ⊗ W2`, the output and input dimensions each split into two factors
    (`m = a b`, `n = c d`); W1 is a x c, W2 is b x d (times the kernel for convs), and either may itself be a
    rank-r product.

    Fields beyond the shared ones:
        decompose_both: also write W1 as a rank-r product W1a W1b (when r < max(a, c) / 2).
        decompose_factor: split each dimension as (f, dim / f) when f divides it; -1 (default) splits it into the
            two divisors closest to its square root.
        rank_dropout_scale: divide the rows kept by rank dropout by the kept fraction.
        init_weights: True (W1 zero: the output is unchanged), "lycoris" (W2 zero instead, as the LyCORIS repo),
            False (every factor random).
    """

    decompose_both: bool = field(default=False, metadata={"help": "Also factor W1 into a rank-r product."})
    decompose_factor: int = field(default=-1, metadata={"help": "Split factor of the dimensions (-1: near sqrt)."})
    rank_dropout_scale: bool = field(default=False, metadata={"help": "Rescale rows kept by rank dropout."})
    init_weights: Union[bool, Literal["lycoris"]] = field(
        default=True, metadata={"help": "True, False or 'lycoris'."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.LOKR
    field_rules: ClassVar[dict[str, Rule]] = {
        "decompose_both": boolean(),
        "decompose_factor": Rule("-1 or a positive int", _factor),
        "rank_dropout_scale": boolean(),
        "init_weights": one_of((True, False, "lycoris")),
    }
