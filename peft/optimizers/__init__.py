"""Optimizers for the tuner types that change how adapters are trained (LoRA-Pro)."""

from .lorapro import AdamWLoRAPro, LoraProAdamW, register_lorapro_adjustment, seed_cosine_scale
from .pairs import LoraProPair, lorapro_pairs

__all__ = ["AdamWLoRAPro", "LoraProAdamW", "LoraProPair", "lorapro_pairs", "register_lorapro_adjustment",
           "seed_cosine_scale"]
