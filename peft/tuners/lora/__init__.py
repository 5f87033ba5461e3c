"""LoRA tuner type."""

from .config import LoraConfig
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .layer import Linear, LoraLayer
from .mha import MultiheadAttention
from .model import LoraModel
from .param_wrapper import ParamWrapper

# bitsandbytes backend: registers its dispatcher first; it imports bitsandbytes only once a model holds its layers.
from . import bnb  # noqa: E402, F401  (isort: skip)
from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_", is_mixed_compatible=True)

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraConfig", "LoraGAConfig", "LoraLayer", "LoraModel",
    "MultiheadAttention", "ParamWrapper", "preprocess_loraga",
]


def __getattr__(name: str):
    """Upstream's LoRA-GA names under this path, served from what peft.tuners.loraga registers (`hooks.py`; this
    package imports none of LoRA-GA): `LoraGAConfig` is upstream's sub-config for `LoraConfig(lora_ga_config=...)`,
    not `peft.LoraGAConfig` (this package's LoRA-GA tuner config); see peft/tuners/loraga/upstream.py."""
    from .hooks import registered_export

    found = registered_export(name)
    if found is not None:
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
