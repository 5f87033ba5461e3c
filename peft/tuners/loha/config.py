"""`LoHaConfig`: upstream's LoHa fields and defaults (see `LycorisCommonConfig` for what each one means)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...utils.peft_types import PeftType
from ..lycoris_common.config import LycorisCommonConfig


@dataclass
class LoHaConfig(LycorisCommonConfig):
    """Low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2022; LyCORIS):
    `delta W = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)`, two rank-r products multiplied elementwise, so `delta W` can
    reach rank r^2 with `2 r (m + n)` parameters for an m x n weight.

    Fields: r, alpha, rank_dropout, module_dropout, use_effective_conv2d, target_modules, exclude_modules,
    init_weights (True: W2b starts at zero, the output is unchanged; False: all factors random), layers_to_transform,
    layers_pattern, rank_pattern, alpha_pattern, modules_to_save.
    """

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.LOHA
