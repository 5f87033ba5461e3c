"""`get_peft_model` and `inject_adapter_in_model`: the two ways to put adapters into a model."""

from __future__ import annotations

from torch import nn

from .config import PeftConfig
from .mixed_model import PeftMixedModel
from .peft_model import PeftModel, _refuse_peft_model, _tuner_class
from .peft_model_tasks import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
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
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Insert adapter layers into `model` without a `PeftModel` wrapper (what transformers' integration uses)."""
    check_adapter_name(adapter_name)
    tuner = _tuner_class(peft_config)(model, peft_config, adapter_name)
    return tuner.model
