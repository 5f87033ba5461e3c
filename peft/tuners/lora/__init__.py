"""LoRA tuner type."""

from .config import LoraConfig
from .conv import Conv2d
from .embedding import Embedding
from .layer import Linear, LoraLayer
from .model import LoraModel

# bitsandbytes backend: registers its dispatcher first; it imports bitsandbytes only once a model holds its layers.
from . import bnb  # noqa: E402, F401  (isort: skip)

__all__ = ["Conv2d", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
