"""`LoHaModel`: injects LoHa layers into a model according to a `LoHaConfig`."""

from __future__ import annotations

from torch import nn

from ..lycoris_common.model import LycorisTunerBase
from .layer import Conv1d, Conv2d, Linear, LoHaLayer


class LoHaModel(LycorisTunerBase):
    """The tuner model for LoHa (`PeftModel.base_model`); its adapter tensors are named `hada_*`."""

    prefix: str = "hada_"
    tuner_layer_cls = LoHaLayer
    layer_classes = ((nn.Conv2d, Conv2d), (nn.Conv1d, Conv1d), (nn.Linear, Linear))
