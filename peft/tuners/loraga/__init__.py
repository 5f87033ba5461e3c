"""LoRA-GA tuner type (Wang, Yu, Li, NeurIPS 2024, arXiv 2407.05000)."""

from .config import LoraGAConfig
from .model import LoraGAModel

__all__ = ["LoraGAConfig", "LoraGAModel"]
