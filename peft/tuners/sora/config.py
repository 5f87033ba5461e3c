"""`SoraConfig`: the fields of a SoRA adapter and what each accepts (this package's own format; upstream PEFT has
no SoRA)."""

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
    pattern_dict,
    regex,
    sequence_of,
    text,
)
from ...utils.peft_types import PeftType

GATE_INITS = ("ones", "normal")
_BIAS = ("none", "all", "sora_only")
_MODULE_NAMES = either(regex(), sequence_of(text(), "module name strings", into=set))


@dataclass
class SoraConfig(PeftConfig):
    """Sparse low-rank adaptation (Ding et al., EMNLP 2023): `W' = W + s B diag(g) A`, `s = lora_alpha / r`, with
    a gate `g` (r entries) trained with an L1 proximal step so that rank components switch off (see
    `peft.tuners.sora.functional` and `SoraGateProximal`).

    Args:
        r: maximal rank (the paper's r_max). lora_alpha: numerator of the scale `s = lora_alpha / r`.
        lora_dropout: dropout on the adapter's input.
        sparsity_lambda: the L1 weight lambda on the gate; each proximal step shrinks the gate by `lr * lambda`.
        gate_init: "ones" (every component starts fully on) or "normal" (N(0, 1) entries, as the authors' code).
        init_sora_weights: True: A Kaiming-uniform, B zero (the adapter starts as a no-op); False: B random too.
        target_modules / exclude_modules: module names (a dotted suffix), a regex (full match) or "all-linear";
            None uses the architecture's LoRA defaults.
        layers_to_transform / layers_pattern: only adapt blocks with these indices (in `<pattern>.<index>.`).
        rank_pattern: per-module number of rank components (regex on a dotted suffix -> int), written by
            `SoraModel.compact` for the surviving ranks. It does not change the scale: `s` stays `lora_alpha / r`,
            so a compacted adapter computes the same function as before.
        fan_in_fan_out: the base stores W as (in, out) (GPT-2's Conv1D). bias: "none", "all" or "sora_only".
        modules_to_save: modules trained and saved whole.
    """

    r: int = field(default=8, metadata={"help": "Maximal rank r_max."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapt these."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    sparsity_lambda: float = field(default=0.1, metadata={"help": "L1 weight on the gate (threshold lr * lambda)."})
    gate_init: Literal["ones", "normal"] = field(default="ones", metadata={"help": "'ones' or 'normal'."})
    init_sora_weights: bool = field(default=True, metadata={"help": "True: B zero (no-op at init)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out)."})
    bias: Literal["none", "all", "sora_only"] = field(default="none", metadata={"help": "Which biases train."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module component count."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.SORA
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": integer(1),
        "target_modules": optional(_MODULE_NAMES),
        "exclude_modules": optional(_MODULE_NAMES),
        "lora_alpha": number(0),
        "lora_dropout": number(0, 1, low_open=False),
        "sparsity_lambda": number(0, low_open=False),
        "gate_init": one_of(GATE_INITS),
        "init_sora_weights": boolean(),
        "fan_in_fan_out": boolean(),
        "bias": one_of(_BIAS),
        "modules_to_save": optional(sequence_of(text(), "module name strings")),
        "layers_to_transform": optional(either(integer(0), sequence_of(integer(0), "ints >= 0"))),
        "layers_pattern": optional(either(text(), sequence_of(text(), "strings"))),
        "rank_pattern": optional(pattern_dict(integer(1))),
    }

    def _check_combinations(self) -> None:
        super()._check_combinations()
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(self, name) is not None and isinstance(self.target_modules, str):
                raise ValueError(f"Invalid {name}={getattr(self, name)!r} with target_modules="
                                 f"{self.target_modules!r} (a regular expression on full module names, which {name} "
                                 "would not restrict): expected target_modules as a list of module names.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"Invalid layers_pattern={self.layers_pattern!r} with layers_to_transform=None: expected "
                             "layers_to_transform to be set too.")
