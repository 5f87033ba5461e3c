"""`LoraGAConfig`: a LoraConfig whose A and B start from the SVD of the estimated gradient (arXiv 2407.05000)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ...utils.config_validation import Rule, integer, number, one_of
from ...utils.peft_types import PeftType
from ..lora.config import LoraConfig
from .init_math import DIRECTIONS, SCALES

DTYPES = ("fp32", "fp64", "bf16", "fp16")
# Upstream PEFT's names for the scales (its `LoraGAConfig` sub-config) -> ours.
SCALE_ALIASES = {"weight_svd": "weightS", "gd_scale": "gd"}


@dataclass
class LoraGAConfig(LoraConfig):
    """LoRA-GA (Wang, Yu, Li, NeurIPS 2024): LoRA whose factors are initialised from the gradient `G` of the
    loss w.r.t. each adapted weight, `A <- V^T[0:r]`, `B <- U[:, r:2r]` (direction "ArB2r"), both scaled, and the
    base weight offset by `-s B A` so that the model's output is unchanged at init.

    Args (besides LoraConfig's; the paper uses `use_rslora=True`):
        bsz: examples per estimation batch (used by `lora_ga_utils.estimation_dataloader`).
        iters: number of estimation batches; `estimate_gradient(..., peft_config=config)` stops after it.
        max_length: estimation sequences are cut to this many tokens (`estimation_dataloader`).
        direction: which singular vectors go to A and B: "ArB2r", "A2rBr", "ArBr" or "random".
        scale: "stable" (`m**0.25 / sqrt(stable_gamma)`), "gd" (`1 / s`), "unit" or "weightS" (from W's spectrum).
        stable_gamma: the gamma of the stable scale.
        dtype: precision of the init: "fp32" or "fp64" run the SVD and the init math in that precision and store
            A and B in the adapter's dtype; "bf16" / "fp16" (the official code's training type) run the math in fp32
            and store A and B in that half dtype. The offset is always computed from A and B as stored.

    `init_lora_weights="lora_ga"` (what the official code sets on this config) is accepted and means the same as
    the default: the LoRA-GA init replaces it whenever gradients wait.
    """

    bsz: int = field(default=2, metadata={"help": "Examples per gradient-estimation batch."})
    iters: int = field(default=2, metadata={"help": "Number of gradient-estimation batches."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per estimation sequence."})
    direction: str = field(default="ArB2r", metadata={"help": f"One of {DIRECTIONS}."})
    dtype: str = field(default="fp32", metadata={"help": f"SVD / init precision, one of {DTYPES}."})
    scale: str = field(default="stable", metadata={"help": f"One of {SCALES}."})
    stable_gamma: float = field(default=16, metadata={"help": "Gamma of the stable scale."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.LORAGA
    field_rules: ClassVar[dict[str, Rule]] = {
        "bsz": integer(1),
        "iters": integer(1),
        "max_length": integer(1),
        "direction": one_of(DIRECTIONS),
        "dtype": one_of(DTYPES),
        "scale": one_of(SCALES, aliases=SCALE_ALIASES),
        "stable_gamma": number(0),
        # "lora_ga" is what the official code sets on this config: the LoRA-GA init happens anyway.
        "init_lora_weights": one_of((True, False, "gaussian"), aliases={"lora_ga": True}),
    }


_OPTION_NAMES = ("direction", "scale", "stable_gamma", "dtype")


@dataclass
class LoraGAInitOptions:
    """The init options alone (what upstream's `LoraConfig(lora_ga_config=...)` sub-config carries)."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16
    dtype: str = "fp32"

    @classmethod
    def from_any(cls, value) -> "LoraGAInitOptions":
        """From a LoraGAConfig, upstream's LoraGAConfig sub-config, a dict, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, dict):  # upstream's sub-config, or a whole LoraGAConfig as saved in adapter_config.json
            known = {f.name for f in dataclasses.fields(LoraGAConfig)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"Unknown lora_ga_config keys {unknown}: expected direction, scale, stable_gamma, "
                                 "dtype.")
            data = {k: value[k] for k in _OPTION_NAMES if k in value}
        else:
            data = {k: getattr(value, k) for k in _OPTION_NAMES if hasattr(value, k)}
        rules = LoraGAConfig.field_rules
        return cls(**{k: rules[k].check(k, v) for k, v in data.items()})
