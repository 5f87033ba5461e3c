"""LoRA-Pro tuner type (Wang et al., ICLR 2025, arXiv 2407.18242): LoRA layers carrying adjusted gradients."""

from .config import LoraProConfig
from .layer import Conv2d, Embedding, Linear, LoraProLayer, LoraProOptions
from .model import LoraProModel

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="lorapro", config_cls=LoraProConfig, model_cls=LoraProModel, prefix="lora_")

__all__ = ["Conv2d", "Embedding", "Linear", "LoraProConfig", "LoraProLayer", "LoraProModel", "LoraProOptions"]
