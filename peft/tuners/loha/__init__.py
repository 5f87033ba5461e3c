"""LoHa tuner type: low-rank Hadamard product (Hyeon-Woo et al., ICLR 2022, arXiv 2108.06098; LyCORIS)."""

from .config import LoHaConfig
from .layer import Conv1d, Conv2d, Linear, LoHaLayer
from .model import LoHaModel

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="loha", config_cls=LoHaConfig, model_cls=LoHaModel, prefix="hada_", is_mixed_compatible=True)

__all__ = ["Conv1d", "Conv2d", "Linear", "LoHaConfig", "LoHaLayer", "LoHaModel"]
