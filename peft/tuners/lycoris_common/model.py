"""`LycorisTunerBase`: injection shared by the LyCORIS-family tuner models (LoHa, LoKr)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..target_matching import all_linear_names, pattern_value
from ..tuners_utils import BaseTuner
from .layer import LycorisLayerBase, UnsupportedTargetError

# Default targets per architecture: upstream uses LoRA's table for LoHa and LoKr (a copy, so edits stay local).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {k: list(v) for k, v in
                                                TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()}


class LycorisTunerBase(BaseTuner):
    """Replaces each targeted Linear / Conv module by the method's layer (`layer_classes`: base type -> layer)."""

    tuner_layer_cls = LycorisLayerBase
    layer_classes: ClassVar[tuple[tuple[type, type], ...]] = ()
    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, config, model_config: dict):
        if config.target_modules is None:
            model_type = model_config.get("model_type")
            defaults = self.default_target_modules.get(model_type)
            if defaults is None:
                raise ValueError(f"target_modules is None and there is no default for model_type {model_type!r}. "
                                 "Please specify `target_modules` (a list of names, a regex, or 'all-linear').")
            config.target_modules = set(defaults)
        elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            config.target_modules = all_linear_names(self.model)
        return config

    def _layer_class(self, target: nn.Module) -> type:
        for base_type, layer_cls in self.layer_classes:
            if isinstance(target, base_type):
                return layer_cls
        supported = ", ".join(t.__name__ for t, _ in self.layer_classes)
        raise UnsupportedTargetError(f"Target module of type {type(target)} not supported, currently only adapters "
                                     f"for {supported} are supported.")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        r = pattern_value(current_key, config.rank_pattern or {}, config.r)
        alpha = pattern_value(current_key, config.alpha_pattern or {}, config.alpha)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, r, alpha, config)
            return
        new_module = self._layer_class(target)(target, adapter_name, config, r=r, alpha=alpha)
        setattr(parent, target_name, new_module)
