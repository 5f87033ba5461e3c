"""LoKr tuner type: low-rank Kronecker product (LyCORIS; Yeh et al., ICLR 2024, arXiv 2309.14859)."""

from .config import LoKrConfig
from .layer import Conv1d, Conv2d, Linear, LoKrLayer
from .model import LoKrModel

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="lokr", config_cls=LoKrConfig, model_cls=LoKrModel, prefix="lokr_", is_mixed_compatible=True)

__all__ = ["Conv1d", "Conv2d", "Linear", "LoKrConfig", "LoKrLayer", "LoKrModel"]
