"""Optimizers for the tuner types that change how adapters are trained (LoRA-Pro)."""

from .hook import register_lorapro_adjustment
from .lorapro import LoraProAdamW
from .pairs import LoraProPair, lorapro_pairs
from .seed import AdamWLoRAPro, AdamWLoraPro, seed_cosine_scale

__all__ = ["AdamWLoRAPro", "AdamWLoraPro", "LoraProAdamW", "LoraProPair", "lorapro_pairs",
           "register_lorapro_adjustment", "seed_cosine_scale"]
