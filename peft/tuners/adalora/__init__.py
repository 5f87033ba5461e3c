"""AdaLoRA tuner type (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023)."""

from .allocator import RankAllocator
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear
from .model import AdaLoraModel

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="adalora", config_cls=AdaLoraConfig, model_cls=AdaLoraModel, prefix="lora_")

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "SVDConv2d", "SVDLinear"]
