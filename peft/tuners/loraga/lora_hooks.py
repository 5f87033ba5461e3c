"""What LoRA-GA plugs into LoRA (`peft.tuners.lora.hooks`), registered when `peft.tuners.loraga` is imported."""

from __future__ import annotations

from ..lora.hooks import LoraInitHook, register_lora_init, register_save_form
from . import upstream
from .conversion import adapter_save_form
from .model import init_from_gradients, offsets_after_injection


def register_lora_hooks() -> None:
    """LoRA's extension points this package fills (`peft.tuners.lora.hooks`): upstream's `init_lora_weights="lora_ga"`
    with its `lora_ga_config` sub-config and import names, and the save form of `save_pretrained`'s upstream
    keywords."""
    register_lora_init(LoraInitHook(
        name="lora_ga", init_layer=init_from_gradients, around_injection=offsets_after_injection,
        sub_config=upstream.LoraGASubConfig,
        exports={"LoraGAConfig": upstream.LoraGASubConfig, "preprocess_loraga": upstream.preprocess_loraga},
    ))
    register_save_form(adapter_save_form)
