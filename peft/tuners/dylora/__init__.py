"""DyLoRA tuner type: LoRA trained at every rank b <= r at once (Valipour et al., EACL 2023, arXiv 2210.07558)."""

from .config import DyLoRAConfig
from .layer import DyLoRALayer, Linear
from .model import DyLoRAModel
from .rank_math import RankSampler

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="dylora", config_cls=DyLoRAConfig, model_cls=DyLoRAModel, prefix="dylora_")

__all__ = ["DyLoRAConfig", "DyLoRALayer", "DyLoRAModel", "Linear", "RankSampler"]
