"""LoRA-GA tuner type (Wang, Yu, Li, NeurIPS 2024, arXiv 2407.05000)."""

from .config import LoraGAConfig
from .lora_hooks import register_lora_hooks
from .model import LoraGAModel

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="loraga", config_cls=LoraGAConfig, model_cls=LoraGAModel, prefix="lora_")
register_lora_hooks()

__all__ = ["LoraGACallback", "LoraGAConfig", "LoraGAModel"]


def __getattr__(name: str):
    """`LoraGACallback` needs transformers: imported on first use."""
    if name == "LoraGACallback":
        from .callback import LoraGACallback

        return LoraGACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
