"""LoRA tuner type."""

from .config import LoraConfig
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .layer import Linear, LoraLayer
from .mha import MultiheadAttention
from .model import LoraModel
from .param_wrapper import ParamWrapper

# bitsandbytes backend: registers its dispatcher first; it imports bitsandbytes only once a model holds its layers.
from . import bnb  # noqa: E402, F401  (isort: skip)

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel", "MultiheadAttention",
    "ParamWrapper",
]
