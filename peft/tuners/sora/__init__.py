"""SoRA tuner type (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models"):
`W + s B diag(g) A` with an L1-sparse gate g trained by proximal steps; this package's own adapter format."""

from .config import SoraConfig
from .functional import proximal_gate_step, scheduled_lambda, soft_threshold
from .layer import Linear, SoraLayer
from .model import SoraModel
from .proximal import SoraGateProximal, non_gate_parameters, sora_gate_parameters

from ...registry import register_peft_method  # noqa: E402  (isort: skip)

register_peft_method(name="sora", config_cls=SoraConfig, model_cls=SoraModel, prefix="sora_")

__all__ = [
    "Linear", "SoraConfig", "SoraGateProximal", "SoraLayer", "SoraModel", "non_gate_parameters",
    "proximal_gate_step", "scheduled_lambda", "soft_threshold", "sora_gate_parameters",
]
