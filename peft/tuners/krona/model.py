"""`KronAModel`: injects KronA layers into a model according to a `KronAConfig`."""

from __future__ import annotations

from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..target_matching import all_linear_names, pattern_value
from ..tuners_utils import BaseTuner
from .conv import Conv2d
from .layer import KronALayer, Linear

# KronA adapts the same projections as LoRA by default (the paper adapts attention's query and value).
DEFAULT_TARGETS: dict[str, list[str]] = dict(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)


def fill_default_targets(model, config, model_config: dict, method: str):
    """`config` with `target_modules` filled in: the architecture's default, or "all-linear" expanded."""
    if config.target_modules is None:
        defaults = DEFAULT_TARGETS.get(model_config.get("model_type"))
        if defaults is None:
            raise ValueError(f"Invalid target_modules=None for model_type {model_config.get('model_type')!r}: "
                             f"expected a list of module names, a regex or 'all-linear' (no {method} default for it).")
        config.target_modules = set(defaults)
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = all_linear_names(model)
    return config


class KronAModel(BaseTuner):
    """The tuner model for KronA: `PeftModel.base_model` is one of these, and its `.model` the wrapped model."""

    prefix: str = "krona_"
    tuner_layer_cls = KronALayer

    def _prepare_adapter_config(self, config, model_config: dict):
        return fill_default_targets(self.model, config, model_config, "KronA")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        dim = pattern_value(current_key, config.krona_dim_pattern or {}, config.krona_dim)
        kwargs = {"krona_dim": dim, "krona_scale": config.krona_scale, "krona_dropout": config.krona_dropout,
                  "init_weights": config.init_weights, "where": f" for module {current_key!r}"}
        if isinstance(target, KronALayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            layer_cls = Conv2d if isinstance(target, nn.Conv2d) else Linear
            layer = layer_cls(target, adapter_name, fan_in_fan_out=config.fan_in_fan_out, **kwargs)
            setattr(parent, target_name, layer)
