"""`LoraProModel`: LoRA injection whose layers are LoRA-Pro layers (they carry the gradient adjustment)."""

from __future__ import annotations

from ..lora.model import LoraModel
from .layer import LoraProOptions, make_lorapro_layer


class LoraProModel(LoraModel):
    """The tuner model for LoRA-Pro: LoRA's targeting, layers and saving; every adapted layer also holds the
    adapter's `LoraProOptions` and computes its own adjusted gradients (see `peft.optimizers.LoraProAdamW`)."""

    prefix: str = "lora_"

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key)
        options = LoraProOptions(mode=config.mode, x_mode=config.x_mode, damping=config.damping)
        make_lorapro_layer(getattr(parent, target_name), adapter_name, options, key=current_key)
