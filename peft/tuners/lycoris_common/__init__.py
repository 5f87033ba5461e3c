"""Shared base of the LyCORIS-family tuner types (LoHa, LoKr): config fields, layer bookkeeping, injection.
Not a tuner type itself (nothing here is registered)."""

from .config import LycorisCommonConfig
from .layer import LycorisLayerBase, UnsupportedTargetError
from .model import LycorisTunerBase

__all__ = ["LycorisCommonConfig", "LycorisLayerBase", "LycorisTunerBase", "UnsupportedTargetError"]
