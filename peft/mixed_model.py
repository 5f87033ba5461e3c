"""`PeftMixedModel`: several adapters of the LoRA family (LoRA, LoRA-GA, LoRA-Pro) active on one model.

All three types share the LoRA layer, so mixing needs no separate machinery: this class is a `PeftModel` whose
`add_adapter` accepts any registered type whose tuner the current tuner derives from.
"""

from __future__ import annotations

from .peft_model import PeftModel


class PeftMixedModel(PeftModel):
    """Upstream's mixed-adapter entry point; transformers' Trainer imports it for `isinstance` checks."""
