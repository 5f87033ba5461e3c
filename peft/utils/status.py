"""What the adapter layers of a model are doing: `get_layer_status` (one record per layer) and `get_model_status`
(the records folded into one summary, with "irregular" where the layers disagree).

Upstream's public API: the two dataclasses keep upstream's field names and meanings, and both functions accept a
`PeftModel`, a transformers model with injected adapters, or any `nn.Module` holding tuner layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

from ..tuners._buffer_dict import BufferDict

IRREGULAR = "irregular"

_BNB_BASES = {"Linear4bit": "bnb 4bit", "Linear8bitLt": "bnb 8bit"}


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Literal["irregular"]]
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Literal["irregular"]]


def agree(values) -> Union[bool, str]:
    """True if every value is True, False if every value is False, else "irregular" (an empty list is True)."""
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return IRREGULAR


def _containers(module: nn.Module, attrs) -> list:
    out = []
    for attr in attrs:
        container = getattr(module, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict)):
            out.append(container)
    return out


def _per_adapter_tensors(module: nn.Module, attrs, params_only: bool) -> dict[str, list]:
    """{adapter: [tensors]} over the module's per-adapter containers named in `attrs` (insertion order)."""
    found: dict[str, list] = {}
    for container in _containers(module, attrs):
        for key, item in container.items():
            if isinstance(item, nn.Module):
                tensors = list(item.parameters()) if params_only else [*item.parameters(), *item.buffers()]
            else:
                tensors = [item] if (not params_only or isinstance(item, nn.Parameter)) else []
            found.setdefault(key, []).extend(tensors)
    return found


def _layer_names(module: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    trainable = tuple(getattr(module, "adapter_layer_names", ("modules_to_save",)))
    other = tuple(getattr(module, "other_param_names", ()))
    return trainable, other


def _available(module: nn.Module, trainable, other) -> list[str]:
    if hasattr(module, "_all_available_adapter_names"):
        return sorted(module._all_available_adapter_names())
    names = set()
    for container in _containers(module, trainable + other):
        names.update(container.keys())
    return sorted(names)


def _quantization_backend(module: nn.Module) -> Optional[str]:
    backend = getattr(module, "quantization_backend", None)
    if backend is not None:
        return backend if isinstance(backend, str) else getattr(backend, "backend_name", str(backend))
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    return _BNB_BASES.get(type(base).__name__) if base is not None else None


def _status_of(name: str, module: nn.Module) -> TunerLayerStatus:
    trainable, other = _layer_names(module)
    grads = _per_adapter_tensors(module, trainable, params_only=True)
    tensors = _per_adapter_tensors(module, trainable + other, params_only=False)
    shown = module
    inner = getattr(module, "token_adapter", None)  # a trainable-tokens wrapper: upstream names its inner layer
    if isinstance(inner, nn.Module):
        name, shown = f"{name}.token_adapter", inner
    return TunerLayerStatus(
        name=name,
        module_type=repr(shown).partition("(")[0],
        enabled=not module.disable_adapters,
        active_adapters=list(module.active_adapters),
        merged_adapters=list(getattr(module, "merged_adapters", [])),
        requires_grad={key: agree(p.requires_grad for p in params) for key, params in grads.items()},
        available_adapters=_available(module, trainable, other),
        devices={key: sorted({t.device.type for t in ts}) for key, ts in tensors.items()},
        quantization_backend=_quantization_backend(module),
    )


def _tuner_root(model: nn.Module, caller: str) -> nn.Module:
    from ..peft_model import PeftModel
    from ..tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, BaseTuner):
            raise TypeError(f"{caller}() got a PeftModel whose adapter is not a tuner-layer method (prompt learning "
                            "keeps no adapter layers); expected a LoRA-style PeftModel.")
        return model.base_model
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One `TunerLayerStatus` per adapter layer (tuner layers and modules_to_save wrappers), in module order.

    `requires_grad[adapter]` is "irregular" when some of that adapter's parameters in the layer train and some do
    not. Raises ValueError when the model holds no adapter layer.
    """
    from ..tuners.tuners_utils import BaseTunerLayer
    from .other import AuxiliaryTrainingWrapper

    root = _tuner_root(model, "get_layer_status")
    statuses = [
        _status_of(name, module)
        for name, module in root.named_modules()
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
    ]
    if not statuses:
        raise ValueError("No adapter layers found in the model: expected a PEFT model or a model with injected "
                         "adapter layers.")
    return statuses


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    from ..peft_model import PeftModel

    return PeftModel.get_nb_trainable_parameters(model)


def _one_or_irregular(values: set):
    return values.pop() if len(values) == 1 else IRREGULAR


def _merged_summary(layers: list[TunerLayerStatus]) -> Union[list[str], str]:
    """Adapters merged somewhere; "irregular" if one of them is present but unmerged on some layer."""
    merged = set().union(*(s.merged_adapters for s in layers))
    for s in layers:
        if merged & (set(s.available_adapters) - set(s.merged_adapters)):
            return IRREGULAR
    return sorted(merged)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layer statuses folded into one `TunerModelStatus`: a field is "irregular" where layers disagree."""
    from ..peft_model import PeftModel

    root = _tuner_root(model, "get_model_status")
    if isinstance(model, PeftModel):
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = type(root).__name__
        peft_types = {name: getattr(c.peft_type, "name", str(c.peft_type)) for name, c in root.peft_config.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        base_model_type = type(model).__name__ if _is_transformers_model(model) else "other"
        adapter_model_type, peft_types = "None", {}
        trainable, total = PeftModel.get_nb_trainable_parameters(model)
    layers = get_layer_status(model)

    active = {tuple(s.active_adapters) for s in layers}
    requires_grad: dict[str, list] = {}
    devices: dict[str, set] = {}
    for s in layers:
        for key, value in s.requires_grad.items():
            requires_grad.setdefault(key, []).append(value)
        for key, value in s.devices.items():
            devices.setdefault(key, set()).update(value)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_one_or_irregular({s.enabled for s in layers}),
        active_adapters=list(_one_or_irregular(active)) if len(active) == 1 else IRREGULAR,
        merged_adapters=_merged_summary(layers),
        requires_grad={key: agree(values) for key, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={key: sorted(value) for key, value in devices.items()},
        quantization_backend=_one_or_irregular({s.quantization_backend for s in layers}),
    )


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)
