"""Tied-LoRA tuner type (Renduchintala et al. 2024): one A and one B per layer shape, tied across layers, with
per-layer scaling vectors."""

from ...registry import register_peft_method
from .config import TiedLoraConfig
from .layer import Linear, TiedLoraLayer
from .model import TiedLoraModel

register_peft_method(name="tiedlora", config_cls=TiedLoraConfig, model_cls=TiedLoraModel, prefix="tied_")

__all__ = ["Linear", "TiedLoraConfig", "TiedLoraLayer", "TiedLoraModel"]
