"""`LoraProConfig`: a LoRA adapter trained with LoRA-Pro's adjusted gradients (arXiv 2407.18242)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from ...utils.peft_types import PeftType
from ..lora.config import LoraConfig
from .math import X_MODES

MODES: tuple[str, ...] = ("full", "efficient")


@dataclass
class LoraProConfig(LoraConfig):
    """LoRA (every `LoraConfig` field) plus LoRA-Pro's optimizer options, read by `peft.optimizers.LoraProAdamW`.

    Args:
        mode: "full" (the paper's Algorithm 2: Adam moments of the equivalent gradient in the full m x n space, in
            fp32; two m x n tensors per adapted layer) or "efficient" (adjust the gradients, then per-factor AdamW:
            LoRA's memory).
        x_mode: the free r x r matrix X of the adjusted gradients: "sylvester" (the paper's choice, the adjusted
            gradients closest to the plain ones), "zero", or "symmetric" (A and B share the common part equally).
        damping: added to the r x r Gram matrices `B^T B` and `A A^T` before they are inverted (>= 0).

    The adapter is saved and loaded like a LoRA adapter (same keys and shapes); `peft_type` is "LORAPRO".
    """

    mode: Literal["full", "efficient"] = field(default="full", metadata={"help": "'full' or 'efficient'."})
    x_mode: Literal["sylvester", "zero", "symmetric"] = field(
        default="sylvester", metadata={"help": "Choice of X: 'sylvester', 'zero' or 'symmetric'."}
    )
    damping: float = field(default=1e-8, metadata={"help": "Added to B^T B and A A^T before inverting."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.LORAPRO

    def _validate(self) -> None:
        super()._validate()
        validate_options(self.mode, self.x_mode, self.damping)

    @staticmethod
    def _extra_inits() -> tuple:
        return ()


def validate_options(mode: str, x_mode: str, damping: float) -> None:
    """Raise ValueError naming the offending value and what was expected."""
    if mode not in MODES:
        raise ValueError(f"Invalid mode={mode!r}: expected one of {MODES}.")
    if x_mode not in X_MODES:
        raise ValueError(f"Invalid x_mode={x_mode!r}: expected one of {X_MODES}.")
    ok = isinstance(damping, (int, float)) and not isinstance(damping, bool) and math.isfinite(damping)
    if not ok or damping < 0:
        raise ValueError(f"Invalid damping={damping!r}: expected a finite number >= 0.")
