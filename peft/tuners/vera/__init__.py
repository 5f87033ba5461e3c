"""VeRA tuner type (Kopiczko et al. 2024): frozen shared random projections, trained per-layer scaling vectors."""

from ...registry import register_peft_method
from .config import VeraConfig
from .layer import Linear, VeraLayer
from .model import VeraModel

register_peft_method(name="vera", config_cls=VeraConfig, model_cls=VeraModel, prefix="vera_lambda_")

__all__ = ["Linear", "VeraConfig", "VeraLayer", "VeraModel"]
