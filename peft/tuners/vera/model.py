"""`VeraModel`: injects VeRA layers and owns the shared random projections (`vera_A`, `vera_B`)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ...utils.transformers_weight_conversion import legacy_module_names
from .._buffer_dict import BufferDict as _PlainBufferDict
from ..target_matching import EXCLUDED, _inside_adapter_machinery, all_linear_names, check_target_module_exists
from ..tuners_utils import BaseTuner
from .layer import Linear, VeraLayer, linear_features
from .projections import draw_projections

# upstream's default targets: LoRA's table, with phi's attention projections only
VERA_DEFAULT_TARGETS = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "phi": ["q_proj", "v_proj"]}


def prepare_targets(model: nn.Module, config, model_config: dict, defaults: dict, method: str):
    """`config` with `target_modules` filled in: the architecture's default, or "all-linear" expanded."""
    if config.target_modules is None:
        model_type = model_config.get("model_type")
        if model_type not in defaults:
            raise ValueError(f"target_modules is None and there is no default for model_type {model_type!r}. "
                             f"Please specify `target_modules` for {method} (a list of names, a regex, or "
                             "'all-linear').")
        config.target_modules = set(defaults[model_type])
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = all_linear_names(model)
    return config


def targeted_linear_shapes(model: nn.Module, config) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every Linear / Conv1D (or layer wrapping one) that `config` targets."""
    legacy = legacy_module_names(model)  # transformers v5 renamed modules: a config may name the old ones

    def targeted(key: str) -> bool:
        found = check_target_module_exists(config, key)
        if found is EXCLUDED or (key in legacy and check_target_module_exists(config, legacy[key]) is EXCLUDED):
            return False
        return bool(found) or (key in legacy and bool(check_target_module_exists(config, legacy[key])))

    shapes = {}
    for key, module in model.named_modules():
        if not key or _inside_adapter_machinery(key) or not targeted(key):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        features = linear_features(base)
        if features is not None:
            shapes[key] = features
    return shapes


class BufferDict(_PlainBufferDict):
    """`vera_A` / `vera_B`: one buffer per adapter, each persistent or not per its adapter's `save_projection`.
    Assigning to an existing entry (`store[name] += 1`) keeps that entry's persistence. (Keeps the class name:
    code that recognises per-adapter containers by type name, as upstream's does, sees a BufferDict.)"""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        persistent = self.persistent
        if key in self._buffers:
            persistent = key not in self._non_persistent_buffers_set
        self.register_buffer(key, value, persistent=persistent)


def _base_device(model: nn.Module, keys) -> torch.device:
    modules = dict(model.named_modules())
    for key in keys:
        weight = getattr(modules[key], "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_meta:
            return weight.device
    return torch.device("cpu")


class VeraModel(BaseTuner):
    """The tuner model for VeRA. `vera_A[name]` (r x max_in) and `vera_B[name]` (max_out x r) are drawn from
    `projection_prng_key` when adapter `name` is added (max over the layers it targets) and shared by its layers;
    they are buffers, persistent when `save_projection` is set."""

    prefix: str = "vera_lambda_"
    tuner_layer_cls = VeraLayer
    uses_shared_state = True

    def _prepare_adapter_config(self, config, model_config: dict):
        return prepare_targets(self.model, config, model_config, VERA_DEFAULT_TARGETS, "VeRA")

    def _inject(self, model: nn.Module, adapter_name: str) -> None:
        if "vera_A" not in self._modules:
            self.vera_A, self.vera_B = BufferDict(), BufferDict()
        config = self.peft_config[adapter_name]
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        shapes = targeted_linear_shapes(model, config)
        if shapes:  # else nothing VeRA can adapt: the generic injection names the problem
            in_max = max(i for i, _ in shapes.values())
            out_max = max(o for _, o in shapes.values())
            device = _base_device(model, shapes)
            shared = self._same_projections(config, in_max, out_max, device)
            if shared is None:
                A, B = draw_projections(config.projection_prng_key, config.r, in_max, out_max)
                shared = A.to(device), B.to(device)
            for store, tensor in zip((self.vera_A, self.vera_B), shared):
                store.register_buffer(adapter_name, tensor, persistent=config.save_projection)
        super()._inject(model, adapter_name)

    def _same_projections(self, config, in_max: int, out_max: int, device: torch.device):
        """The (A, B) tensors of an existing adapter drawn from the same key at the same size, to share (as upstream,
        adapters with one key use the same projection tensors); None when there is none."""
        for name, A in self.vera_A.items():
            B = self.vera_B[name]
            existing = self.peft_config.get(name)
            if (existing is not None and existing.projection_prng_key == config.projection_prng_key
                    and A.shape == (config.r, in_max) and B.shape == (out_max, config.r) and A.device == device
                    and A.dtype == torch.get_default_dtype()):
                return A, B
        return None

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        base = target.get_base_layer() if isinstance(target, VeraLayer) else target
        is_conv1d = type(base).__name__ == "Conv1D"
        if linear_features(base) is not None and config.fan_in_fan_out != is_conv1d:
            warnings.warn(f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module {current_key!r} "
                          f"is a {type(base).__name__}. Setting fan_in_fan_out to {is_conv1d}.")
            config.fan_in_fan_out = is_conv1d
        if isinstance(target, VeraLayer):
            target.update_layer(adapter_name, config)
            return
        layer = Linear(target, (self.vera_A, self.vera_B), adapter_name, config)
        setattr(parent, target_name, layer)

    def _drop_projections(self, adapter_name: str) -> None:
        for store in (self._modules.get("vera_A"), self._modules.get("vera_B")):
            if store is not None and adapter_name in store:
                del store[adapter_name]

    def purge_adapter(self, model: nn.Module, adapter_name: str) -> None:
        super().purge_adapter(model, adapter_name)
        self._drop_projections(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_projections(adapter_name)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """Upstream's keys for the shared projections: `vera_A` / `vera_B` (under `base_model.` in a PeftModel's
        file) when `save_projection` is set; else none (loading draws them again from `projection_prng_key`)."""
        config = self.peft_config.get(adapter_name)
        if config is None or not config.save_projection or adapter_name not in self._modules.get("vera_A", {}):
            return {}
        return {"vera_A": f"vera_A.{adapter_name}", "vera_B": f"vera_B.{adapter_name}"}
