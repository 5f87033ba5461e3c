"""KronA tuner type: Kronecker-product adapters (Edalati et al. 2022, arXiv 2212.10650)."""

from .config import KronAConfig
from .conv import Conv2d
from .layer import KronALayer, Linear
from .model import KronAModel

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="krona", config_cls=KronAConfig, model_cls=KronAModel, prefix="krona_")

__all__ = ["Conv2d", "KronAConfig", "KronALayer", "KronAModel", "Linear"]
