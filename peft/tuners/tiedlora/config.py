"""`TiedLoraConfig`: the fields of a Tied-LoRA adapter (this package's own type, `PeftType.TIEDLORA`)."""

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

_BIAS = ("none", "all", "tiedlora_only")
_MODULE_NAMES = either(regex(), sequence_of(text(), "module name strings", into=set))


@dataclass
class TiedLoraConfig(PeftConfig):
    """Tied-LoRA (Renduchintala, Konuk, Kuchaiev, NAACL 2024, arXiv 2311.09578):
    `h = W x + s diag(v_l) B diag(u_l) A x`, `s = lora_alpha / r`, where one `A` (r x in) and one `B` (out x r)
    are shared by every adapted layer of the same (out, in) shape and `u_l` (r) and `v_l` (out) belong to layer l.

    The paper's trainable / frozen combinations are flags: `train_shared=True, train_scalings=True` (default:
    tied A, B and the vectors u, v all trained, the configuration the paper recommends); `train_shared=False`
    (frozen random tied A, B, trained u, v: VeRA-like); `train_scalings=False` (plain LoRA with A and B tied across
    layers, u = v = 1, no vectors stored).

    Args:
        r: rank. lora_alpha: numerator of the scale `s = lora_alpha / r`. lora_dropout: dropout on the adapter input.
        target_modules: module names (dotted suffix), a regex (full match) or "all-linear"; Linear / Conv1D only.
        exclude_modules: same forms; matches are never adapted.
        train_shared: train the tied A and B. train_scalings: create and train the vectors u and v.
        init_weights: True: A Kaiming-uniform, u = 1 and either v = 0 with B random (`train_scalings`) or B = 0
            (no vectors), so the wrapped model equals the base; False: v = 1 (B random), a non-zero update.
        fan_in_fan_out: the base stores W as (in, out) (GPT-2's Conv1D). bias: "none", "all" or "tiedlora_only".
        modules_to_save: modules trained whole. layers_to_transform / layers_pattern: only adapt these blocks.
    """

    r: int = field(default=8, metadata={"help": "Rank of the tied A and B."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapt these."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator (s = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    train_shared: bool = field(default=True, metadata={"help": "Train the tied A and B."})
    train_scalings: bool = field(default=True, metadata={"help": "Use and train the per-layer vectors u and v."})
    init_weights: bool = field(default=True, metadata={"help": "Init so that the adapter starts as a no-op."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out)."})
    bias: Literal["none", "all", "tiedlora_only"] = field(default="none", metadata={"help": "Which biases train."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.TIEDLORA
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": integer(1),
        "target_modules": optional(_MODULE_NAMES),
        "exclude_modules": optional(_MODULE_NAMES),
        "lora_alpha": number(0),
        "lora_dropout": number(0, 1, low_open=False),
        "train_shared": boolean(),
        "train_scalings": boolean(),
        "init_weights": boolean(),
        "fan_in_fan_out": boolean(),
        "bias": one_of(_BIAS),
        "modules_to_save": optional(sequence_of(text(), "module name strings")),
        "layers_to_transform": optional(either(integer(0), sequence_of(integer(0), "ints >= 0"))),
        "layers_pattern": optional(either(text(), sequence_of(text(), "strings"))),
    }

    def _check_combinations(self) -> None:
        super()._check_combinations()
        if not (self.train_shared or self.train_scalings):
            raise ValueError("Invalid train_shared=False with train_scalings=False: nothing would train; expected at "
                             "least one of them True.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                             f"(got layers_pattern={self.layers_pattern!r}, layers_to_transform=None).")
