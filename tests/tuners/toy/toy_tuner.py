"""A test-only tuner type, written the way docs/architecture.md says a new type is written: this one file (a
config, a layer, a tuner model) and one registration call, nothing edited outside it. It scales each output
channel of an nn.Linear by a trainable vector: `y = l * (W x) + b` ((IA)^3-like), `l` initialised to ones.

Its container is `toy_scale` (prefix "toy_"), a ParameterDict; the generic framework must save it as
`<path>.toy_scale`, freeze it for inference adapters and load it back, knowing nothing about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from peft.config import PeftConfig
from peft.registry import PEFT_TYPE_TO_TUNER_MAPPING, register_peft_method
from peft.tuners.tuner_layer import BaseTunerLayer
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.peft_types import PeftType


@dataclass
class ToyConfig(PeftConfig):
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_value: float = field(default=1.0)

    peft_type_default: ClassVar[Optional[PeftType]] = None  # set once registered (the member is created then)

    def __post_init__(self) -> None:
        self.peft_type = PeftType("TOY")
        super().__post_init__()


class ToyLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("toy_scale",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, init_value: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.toy_scale = nn.ParameterDict({})
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, init_value)

    def update_layer(self, adapter_name: str, init_value: float) -> None:
        weight = self.base_layer.weight
        self.toy_scale[adapter_name] = nn.Parameter(torch.full((weight.shape[0],), float(init_value),
                                                               dtype=weight.dtype, device=weight.device))
        self.set_adapter(self.active_adapters)  # a further adapter starts inactive (frozen) until set_adapter

    def _scale(self, names) -> torch.Tensor:
        scale = torch.ones_like(self.base_layer.weight[:, 0])
        for name in names:
            if name in self.toy_scale:
                scale = scale * self.toy_scale[name]
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x)
        out = nn.functional.linear(x, self.base_layer.weight) * self._scale(self.active_adapters)
        return out if self.base_layer.bias is None else out + self.base_layer.bias

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        names = [n for n in (adapter_names or self.active_adapters) if n in self.toy_scale and
                 n not in self.merged_adapters]
        with torch.no_grad():
            for name in names:
                self.base_layer.weight.mul_(self.toy_scale[name][:, None])
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged_adapters:
                self.base_layer.weight.div_(self.toy_scale[self.merged_adapters.pop()][:, None])


class ToyModel(BaseTuner):
    prefix = "toy_"
    tuner_layer_cls = ToyLayer

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, ToyLayer):
            target.update_layer(adapter_name, config.init_value)
        elif isinstance(target, nn.Linear):
            setattr(parent, target_name, ToyLayer(target, adapter_name, config.init_value))
        else:
            raise ValueError(f"Toy adapts nn.Linear only, got {type(target).__name__} at {current_key!r}.")


def register() -> None:
    """The one registration call (idempotent, as tests import this module more than once)."""
    if not any(cls is ToyModel for cls in PEFT_TYPE_TO_TUNER_MAPPING.values()):
        register_peft_method(name="toy", config_cls=ToyConfig, model_cls=ToyModel, prefix="toy_",
                             extend_peft_type=True)


register()
