"""`LoKrModel`: injects LoKr layers into a model according to a `LoKrConfig`."""

from __future__ import annotations

from torch import nn

from ..lycoris_common.model import LycorisTunerBase
from .layer import Conv1d, Conv2d, Linear, LoKrLayer


class LoKrModel(LycorisTunerBase):
    """The tuner model for LoKr (`PeftModel.base_model`); its adapter tensors are named `lokr_*`."""

    prefix: str = "lokr_"
    tuner_layer_cls = LoKrLayer
    layer_classes = ((nn.Conv2d, Conv2d), (nn.Conv1d, Conv1d), (nn.Linear, Linear))
