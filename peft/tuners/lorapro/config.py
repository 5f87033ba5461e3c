"""`LoraProConfig`: a LoRA adapter trained with LoRA-Pro's adjusted gradients (arXiv 2407.18242)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from ...utils.config_validation import Rule, number, one_of
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
    field_rules: ClassVar[dict[str, Rule]] = {
        "mode": one_of(MODES),
        "x_mode": one_of(X_MODES),
        "damping": number(0, low_open=False),
        "init_lora_weights": one_of((True, False, "gaussian")),  # no "lora_ga": that is LoraGAConfig's job
    }


def validate_options(mode: str, x_mode: str, damping: float) -> None:
    """Check LoRA-Pro's options (the optimizer's keyword arguments) with `LoraProConfig`'s rules."""
    for name, value in (("mode", mode), ("x_mode", x_mode), ("damping", damping)):
        LoraProConfig.field_rules[name].check(name, value)
