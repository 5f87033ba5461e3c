"""LoRA tuner type."""

from .config import LoraConfig
from .conv import Conv2d
from .embedding import Embedding
from .layer import Linear, LoraLayer
from .model import LoraModel

__all__ = ["Conv2d", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
