"""Tuner types. Each lives in its own folder and registers itself in `peft/__init__.py`."""

from .lora import LoraConfig, LoraModel

__all__ = ["LoraConfig", "LoraModel"]
