"""`get_peft_model` and `inject_adapter_in_model`: the two ways to put adapters into a model."""

from __future__ import annotations

import warnings

from torch import nn

from .config import PeftConfig
from .mixed_model import PeftMixedModel
from .peft_model import PeftModel, _refuse_peft_model, _tuner_class
from .peft_model_tasks import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from .registry import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from .utils.adapter_names import check_adapter_name


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
    autocast_adapter_dtype: bool = True, revision: str | None = None, low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` (in place) with a new adapter; the `PeftModelFor*` class follows `peft_config.task_type`."""
    _refuse_peft_model(model, "add_adapter(adapter_name, peft_config)")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
    _tuner_class(peft_config)  # an unknown or unimplemented type (e.g. prompt learning) fails before any change
    if getattr(model, "peft_config", None):  # adapters were injected into this module before, in place
        warnings.warn(f"You are trying to modify a model that already holds adapters {sorted(model.peft_config)} "
                      "(get_peft_model changes the model in place). To start again from the plain model with another "
                      "config, call .unload() on the earlier PeftModel first.")
    check_adapter_name(adapter_name)
    model_config = getattr(model, "config", None)
    name_or_path = getattr(model_config, "_name_or_path", None) or getattr(model_config, "name_or_path", None)
    if peft_config.base_model_name_or_path is None and name_or_path:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    if mixed:
        return PeftMixedModel(model, peft_config, adapter_name)
    task = getattr(peft_config.task_type, "value", None)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def get_peft_config(config_dict: dict) -> PeftConfig:
    """The config object a dict (e.g. a parsed `adapter_config.json`) describes, by its `peft_type`."""
    return PEFT_TYPE_TO_CONFIG_MAPPING[config_dict["peft_type"]](**config_dict)


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Insert adapter layers into `model` without a `PeftModel` wrapper (what transformers' integration uses).
    `low_cpu_mem_usage=True`: the adapter weights are created on `meta`; load a state dict (e.g. with
    `set_peft_model_state_dict` after `peft.functional.materialize_adapter`) before using the model."""
    check_adapter_name(adapter_name)
    tuner_cls = _tuner_class(peft_config)
    if tuner_cls.uses_shared_state:
        raise ValueError(f"inject_adapter_in_model does not support {peft_config.peft_type.value}: it keeps shared "
                         "state on the tuner; use get_peft_model instead.")
    tuner = tuner_cls(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return tuner.model


__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
]
