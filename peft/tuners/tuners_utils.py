"""Base class of every tuner model (`BaseTuner`: injection, adapter management, merge / unload). The layer mixin,
`BaseTunerLayer`, lives in `tuner_layer.py` and is re-exported here (transformers imports it from this module)."""

from __future__ import annotations

import dataclasses
import warnings
from abc import abstractmethod
from contextlib import contextmanager, nullcontext
from typing import Any, Optional, Union

import torch
from torch import nn

from ..utils.adapter_names import check_adapter_name
from ..utils.constants import DUMMY_MODEL_CONFIG, MIN_TARGET_MODULES_FOR_OPTIMIZATION, TASK_TYPE_TO_HEAD_MODULES
from ..utils.other import ModulesToSaveWrapper, get_submodules
from ..utils.transformers_weight_conversion import legacy_module_names
from .target_matching import (
    EXCLUDED,
    _inside_adapter_machinery,
    check_target_module_exists,
    compress_target_modules,
    no_match_error,
    unmatched_target_warning,
    unused_pattern_warnings,
)
from .target_matching import filter_state_dict_by_key_prefixes as _filter_state_dict_by_key_prefixes
from .target_matching import minimal_target_suffixes as _find_minimal_target_modules
from .target_matching import tuner_state_dict_key_prefixes as _get_tuner_state_dict_key_prefixes
from .tuner_checks import _refuse_names_inside_tuner_layers, _warn_if_weights_are_tied
from .tuner_layer import BaseTunerLayer
from .unloading import MergeUnloadMixin


class BaseTuner(MergeUnloadMixin, nn.Module):
    """Wraps `model` in place: injects tuner layers for every module its config targets.

    `self.model` is the wrapped model, `self.peft_config` maps adapter names to configs. Subclasses set `prefix`
    (the start of their container names, as registered) and `tuner_layer_cls`, implement `_create_and_replace`, and
    may override `_prepare_adapter_config` (default target modules) and `_mark_only_adapters_as_trainable`.
    """

    prefix: str = ""
    tuner_layer_cls: type = BaseTunerLayer
    # config fields whose keys are patterns of module names (warned about when they select nothing)
    module_pattern_fields: tuple[str, ...] = ("rank_pattern", "alpha_pattern")
    uses_shared_state: bool = False  # no state shared between layers: inject_adapter_in_model works (upstream flag)
    _weights_on_meta: bool = False

    def __init__(
        self, model: nn.Module, peft_config, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict] = None,
    ):
        super().__init__()
        for name in peft_config if isinstance(peft_config, dict) else [adapter_name]:
            check_adapter_name(name)
        self.model = model
        if not hasattr(self, "peft_config"):
            self.peft_config = {}
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        self.peft_config.update(configs)
        self.active_adapter: Union[str, list[str]] = adapter_name
        with self.adapter_weights_on_meta(low_cpu_mem_usage):
            self.inject_adapter(self.model, adapter_name)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def forward_context(self, peft_model: nn.Module, kwargs: dict, generate: bool = False):
        """The context `PeftModel.forward` / `generate` runs in, from keywords this tuner type handles (popped from
        `kwargs`). Default: none; `adapter_names=` (per-sample adapters) is refused, since only tuner types that
        override this support it."""
        if kwargs.pop("adapter_names", None) is not None and peft_model.has_active_enabled_adapter:
            raise ValueError(f"adapter_names=...: per-sample adapters are not supported by {type(self).__name__}.")
        return nullcontext()

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # --- hooks for subclasses -----------------------------------------------------------------------------------
    @abstractmethod
    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None: ...

    def _prepare_adapter_config(self, config, model_config: dict):
        return config

    def _check_new_adapter_config(self, config) -> None:
        """Called with the new adapter's config already in `peft_config`. Base biases are shared by every adapter,
        so only one adapter may train them."""
        with_bias = [name for name, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if len(with_bias) > 1:
            raise ValueError(f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                             f"set bias='none' for all but one: adapters {with_bias} all train the shared base biases.")

    # --- injection ----------------------------------------------------------------------------------------------
    @contextmanager
    def adapter_weights_on_meta(self, enabled: bool = True):
        """Inside, injected adapters get their weights on the `meta` device (no memory, no init): what
        `low_cpu_mem_usage=True` means. They must be loaded from a state dict before use (`PeftModel` does it).
        Only for the plain inits; data-driven ones (LoRA-GA) need real tensors and ignore it."""
        previous, self._weights_on_meta = self._weights_on_meta, bool(enabled)
        try:
            yield
        finally:
            self._weights_on_meta = previous

    def _init_needs_real_weights(self, config) -> bool:
        """True when the adapter's init reads real tensors (a data-driven init), so `low_cpu_mem_usage` cannot
        create its weights on the meta device. Tuner types with such inits override this."""
        return False

    def _creation_device(self, config):
        on_meta = self._weights_on_meta and not self._init_needs_real_weights(config)
        return torch.device("meta") if on_meta else nullcontext()

    def inject_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Replace every targeted module by a tuner layer carrying adapter `adapter_name`. All-or-nothing: on any
        error the modules, adapter weights and `requires_grad` flags are put back as they were."""
        snapshot = [(p, p.requires_grad) for p in model.parameters()]
        had_adapters = any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in model.modules())
        try:
            self._inject(model, adapter_name)
        except Exception:
            self.purge_adapter(model, adapter_name)
            for param, flag in snapshot:
                param.requires_grad_(flag)
            raise
        if had_adapters:  # a further adapter leaves what was trainable (or frozen) before as it was
            for param, flag in snapshot:
                param.requires_grad_(flag)

    def purge_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Remove every trace of `adapter_name` from `model`'s layers (not from `peft_config`): its weights, and
        the tuner layers / `modules_to_save` wrappers left with no adapter, which give back their original module."""
        wrappers = [(k, m) for k, m in model.named_modules()
                    if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) and not _inside_adapter_machinery(k)]
        for key, module in wrappers:
            module.delete_adapter(adapter_name)
            if isinstance(module, ModulesToSaveWrapper):
                original = module.original_module if not len(module.modules_to_save) else None
            else:
                original = module.emptied_replacement()
            if original is not None:
                parent, _, name = get_submodules(model, key)
                setattr(parent, name, original)
        layers = {k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        self.targeted_module_names = [k for k in getattr(self, "targeted_module_names", []) if k in layers]

    def _inject(self, model: nn.Module, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        if hasattr(config, "validate"):  # containers edited in place (config.rank_pattern[k] = v) skip __setattr__
            config.validate()
        self._check_new_adapter_config(config)
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        keys = [k for k, _ in model.named_modules() if k and not _inside_adapter_machinery(k)]
        if getattr(config.peft_type, "value", config.peft_type) != "IA3":  # its feedforward_modules: a subset
            config.target_modules = compress_target_modules(config.target_modules, keys,
                                                            MIN_TARGET_MODULES_FOR_OPTIMIZATION)
        self.peft_config[adapter_name] = config
        legacy = legacy_module_names(model)  # transformers v5 renamed modules: a config may name the old ones
        matched, excluded = [], []
        for key in keys:
            found = check_target_module_exists(config, key)
            if found is EXCLUDED or (key in legacy and check_target_module_exists(config, legacy[key]) is EXCLUDED):
                excluded.append(key)
                continue
            if not (found or (key in legacy and check_target_module_exists(config, legacy[key]))):
                continue
            parent, target, target_name = get_submodules(model, key)
            with self._creation_device(config):
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
            matched.append(key)
        matched_params = self._inject_parameters(model, config, adapter_name)
        if not matched and not matched_params:
            raise no_match_error(config, model, excluded, unmatched=len(keys) > len(excluded))
        warning = unmatched_target_warning(config, matched, matched_params, excluded)
        if warning is not None:
            warnings.warn(*warning)
        targeted = matched + [k.rpartition(".")[0] for k in matched_params]
        for message in unused_pattern_warnings(config, targeted, self.module_pattern_fields):
            warnings.warn(message, RuntimeWarning)
        known = getattr(self, "targeted_module_names", [])
        self.targeted_module_names = known + [k for k in matched if k not in known]
        params = getattr(self, "targeted_parameter_names", [])
        self.targeted_parameter_names = params + [k for k in matched_params if k not in params]
        _warn_if_weights_are_tied(model, matched)
        self._wrap_modules_to_save(model, config, adapter_name)
        self.set_adapter(self.active_adapters)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            self.set_requires_grad(adapter_name, requires_grad=False)
        self._wrap_trainable_tokens(model, config, adapter_name)

    def _inject_parameters(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        """Adapt the bare parameters the config names (LoRA's `target_parameters`); returns their keys."""
        return []

    def _wrap_modules_to_save(self, model: nn.Module, config, adapter_name: str) -> None:
        names = config.modules_to_save or []
        _refuse_names_inside_tuner_layers(model, names, ModulesToSaveWrapper, adapter_name)
        found = set()
        for key, module in list(model.named_modules()):
            if _inside_adapter_machinery(key) or not any(key == n or key.endswith("." + n) for n in names):
                continue
            found.update(n for n in names if key == n or key.endswith("." + n))
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
                continue
            if isinstance(module, _CONTAINER_TYPES) or isinstance(module, BaseTunerLayer):
                raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module)} ({key!r}): it "
                                "has no forward of its own; name the modules inside it instead.")
            parent, target, target_name = get_submodules(model, key)
            setattr(parent, target_name, ModulesToSaveWrapper(target, adapter_name))
        task = getattr(config.task_type, "value", config.task_type)
        optional = TASK_TYPE_TO_HEAD_MODULES.get(task, [])
        missing = [n for n in names if n not in found and n not in optional]
        if missing:
            raise ValueError(f"modules_to_save={names} names modules that do not exist in the model: {missing}.")

    def _wrap_trainable_tokens(self, model: nn.Module, config, adapter_name: str) -> None:
        """Train the rows `config.trainable_token_indices` names (see `peft.tuners.trainable_tokens`)."""
        from .trainable_tokens.inject import inject_trainable_tokens

        inject_trainable_tokens(model, config, adapter_name, self.active_adapters)

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        """`model.config` as a dict (`to_dict()`, a dict, or a dataclass); `{"model_type": "custom"}` without one."""
        config = getattr(model, "config", None)
        if config is None:
            return dict(DUMMY_MODEL_CONFIG)
        if hasattr(config, "to_dict"):
            return config.to_dict()
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            return dataclasses.asdict(config)
        return dict(config)

    # --- adapter management -------------------------------------------------------------------------------------
    def tuner_layers(self):
        """(name, layer) for every tuner layer of the wrapped model."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Unknown adapter {name!r}; available adapters: {sorted(self.peft_config)}.")
        wrappers = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        for module in wrappers:  # checked before anything changes
            module.check_set_adapter(names)
        for _, layer in self.tuner_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(names)
        for module in wrappers:
            module.set_adapter(names)
        self.active_adapter = names[0] if len(names) == 1 else names
        if inference_mode:
            self.set_requires_grad(names, requires_grad=False)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights (LoRA factors, `modules_to_save` copies) on or off,
        whether they are active or not; nothing else changes."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names)
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                containers = [getattr(module, attr) for attr in module.adapter_layer_names]
            elif isinstance(module, ModulesToSaveWrapper):
                containers = [module.modules_to_save]
            else:
                continue
            for container in containers:
                for name in names:
                    if name in container:
                        container[name].requires_grad_(requires_grad)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                module.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name` everywhere. A merged adapter is refused (its delta is in the base weights, which
        could then never be taken out again): unmerge first."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; available adapters: {sorted(self.peft_config)}.")
        if any(adapter_name in layer.merged_adapters for _, layer in self.tuner_layers()):
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        was_active = self.active_adapters
        del self.peft_config[adapter_name]
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                module.delete_adapter(adapter_name)
        if adapter_name in was_active:  # the other active adapters stay active; else the first one left
            remaining = [n for n in was_active if n != adapter_name] or list(self.peft_config)[:1]
            self.active_adapter = []
            if remaining:
                self.set_adapter(remaining)

    def adapter_save_form(self, peft_model: nn.Module, adapter_names: list[str], kwargs: dict):
        """`(name, weights, config) -> (weights, config)`: the form `PeftModel.save_pretrained` writes each adapter
        in, from the save keywords in `kwargs` (popped; checked before anything is written). Default: as they are;
        upstream's keywords that would change what is written are refused by name (other keywords are ignored, as
        upstream ignores them outside `push_to_hub`)."""
        embedding = kwargs.pop("save_embedding_layers", "auto")
        changing = [k for k in ("path_initial_model_for_weight_conversion", "convert_pissa_to_lora") if k in kwargs]
        if changing or embedding not in ("auto", False):
            raise ValueError(f"save_pretrained({', '.join(changing or ['save_embedding_layers=' + repr(embedding)])}) "
                             f"is not supported by {type(self).__name__}: it writes its adapters as they are.")
        return lambda name, weights, config: (weights, config)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """On-disk key -> in-memory key (relative to this tuner) of state the tuner model itself holds for adapter
        `adapter_name` (e.g. projections shared by all layers); tuner layers and wrappers report their own."""
        return {}

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything but the adapter containers of the tuner layers (`adapter_layer_names`), the
        `modules_to_save` copies and the biases the active adapters' `bias` setting trains ("all", or
        "<method>_only": the adapted layers' base biases)."""
        own = set()
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                own.update(id(p) for attr in module.adapter_layer_names
                           for p in getattr(module, attr, nn.Module()).parameters())
            elif isinstance(module, ModulesToSaveWrapper):
                own.update(id(p) for p in module.modules_to_save.parameters())
        for param in model.parameters():
            if id(param) not in own:
                param.requires_grad_(False)
        for adapter in self.active_adapters:
            config = self.peft_config[adapter]
            if not config.inference_mode:  # a frozen (inference) adapter trains no bias either
                self._train_biases(model, str(getattr(config, "bias", "none")))

    def _train_biases(self, model: nn.Module, bias: str) -> None:
        if bias == "all":
            for name, param in model.named_parameters():
                if name.endswith("bias") and "original_module" not in name.split("."):
                    param.requires_grad_(True)
        elif bias.endswith("_only"):
            for _, layer in self.tuner_layers():
                base_bias = getattr(layer.get_base_layer(), "bias", None)
                if base_bias is not None:
                    base_bias.requires_grad_(True)


_model_config_dict = BaseTuner.get_model_config  # the name LoRA-GA's helpers import

_CONTAINER_TYPES = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


__all__ = [
    "BaseTuner",
    "BaseTunerLayer",
    "_filter_state_dict_by_key_prefixes",
    "_find_minimal_target_modules",
    "_get_tuner_state_dict_key_prefixes",
    "check_target_module_exists",
]
