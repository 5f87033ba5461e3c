"""`PeftModel`: a model with adapters, its save/load in upstream's format, and adapter management."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .registry import PEFT_TYPE_TO_TUNER_MAPPING
from .tuners.prompt_learning import PromptLearningConfig, not_implemented_error
from .utils.adapter_names import adapter_folder, check_adapter_name
from .utils.other import ModulesToSaveWrapper
from .utils.save_and_load import (
    get_peft_model_state_dict,
    load_adapter_pair,
    load_peft_weights,
    save_adapter_folder,
    set_peft_model_state_dict,
)
from .utils.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .utils.transformers_weight_conversion import convert_adapter_state_dict

_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "force_download", "local_files_only")


class PeftModel(nn.Module):
    """Base model plus adapters. `self.base_model` is the tuner model (e.g. `LoraModel`), whose `.model` is the
    wrapped transformers (or any torch) model, so parameter names read `base_model.model.<path>`."""

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
    ) -> None:
        _refuse_peft_model(model, "add_adapter(adapter_name, peft_config)")
        super().__init__()
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}.")
        tuner_cls = _tuner_class(peft_config)
        check_adapter_name(adapter_name)
        self._prepare_config(peft_config, model)
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self.base_model = tuner_cls(model, {adapter_name: peft_config}, adapter_name,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
        self._apply_adapter_dtype(adapter_name, autocast_adapter_dtype)
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5 spelling
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        self._added_input_grad_hooks = bool(checkpointing) and _enable_input_grads(model)

    # --- plumbing -----------------------------------------------------------------------------------------------
    def _prepare_config(self, peft_config: PeftConfig, model: nn.Module) -> None:
        """Task subclasses add their heads to `modules_to_save`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        active = self.base_model.active_adapter
        return active if isinstance(active, str) else active[0]

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Names of the modules trained whole, over every adapter (None when there are none)."""
        names = {n for config in self.peft_config.values() for n in (getattr(config, "modules_to_save", None) or [])}
        return names or None

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.get_base_model(), "dtype", None)

    def forward(self, *args, **kwargs):
        with self.base_model.forward_context(self, kwargs):
            return self.base_model(*args, **kwargs)  # the tuner may add to the output (AdaLoRA's regulariser)

    def generate(self, *args, **kwargs):
        with self.base_model.forward_context(self, kwargs, generate=True):
            return self.get_base_model().generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def _apply_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """True (upstream's default): adapters of fp16/bf16 bases stay in fp32, as the layers create them (a dtype a
        tuner chose on purpose, e.g. LoRA-GA's `dtype`, is kept); False: they take the base layer's fp16/bf16 dtype."""
        from .functional import keep_base_adapter_dtype

        if not autocast_adapter_dtype:
            keep_base_adapter_dtype(self.get_base_model(), adapter_name)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside `disable_adapter()` (or after `disable_adapter_layers()`), or with no active adapter."""
        layers = [m for _, m in self.base_model.tuner_layers()]
        return bool(self.active_adapters) and not (layers and all(m.disable_adapters for m in layers))

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload adapter", private: Optional[bool] = None,
                    token: Optional[str] = None, **save_kwargs) -> Any:
        """Save the adapter(s) to a temporary folder and upload it to the Hub repo `repo_id` (created if needed)."""
        from .utils.hub import push_folder_to_hub

        return push_folder_to_hub(self.save_pretrained, repo_id, commit_message, private, token, **save_kwargs)

    # --- parameters ---------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit weight stores two values per byte of its storage dtype."""
        trainable, total = 0, 0
        for param in self.parameters():
            n = param.numel()
            if type(param).__name__ == "Params4bit":
                n *= 2 * param.element_size()  # uint8 storage: 2 values per element; bf16 storage: 4
            total += n
            trainable += n if param.requires_grad else 0
        return trainable, total

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One status record per adapter layer (see `peft.utils.status.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The adapter layers' statuses summarised (see `peft.utils.status.get_model_status`)."""
        return get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / max(total, 1)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # --- adapters -----------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Inject a further adapter; the active adapter stays what it was. `low_cpu_mem_usage=True`: its weights
        are created on `meta` (load them before use, e.g. with `load_adapter`)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists; delete it first or pick another one.")
        if not isinstance(self.base_model, _tuner_class(peft_config)):
            raise ValueError(
                f"Cannot add a {peft_config.peft_type.value} adapter to a {self.peft_type.value} model."
            )
        self._prepare_config(peft_config, self.get_base_model())
        snapshot = _requires_grad_snapshot(self)
        self.peft_config[adapter_name] = peft_config
        try:
            with self.base_model.adapter_weights_on_meta(low_cpu_mem_usage):
                self.base_model.inject_adapter(self.get_base_model(), adapter_name)
            self._apply_adapter_dtype(adapter_name, autocast_adapter_dtype)
        except Exception:
            self._remove_adapter_quietly(adapter_name, snapshot)
            raise

    def _remove_adapter_quietly(self, adapter_name: str, snapshot: dict) -> None:
        """Undo a just-added adapter: its config, its weights, and the layers wrapped only for it."""
        self.peft_config.pop(adapter_name, None)
        self.base_model.purge_adapter(self.get_base_model(), adapter_name)
        _restore_requires_grad(self, snapshot)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make the named adapter(s) active and trainable (frozen with `inference_mode=True`); others are frozen."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters on or off, active or not (nothing else changes)."""
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    @contextmanager
    def disable_adapter(self):
        """Context manager: inside, the model computes exactly the base model's outputs. On exit the adapters
        are as they were before: on, or still off when they were all off (nested contexts, or after
        `disable_adapter_layers()`); every `requires_grad` flag is what it was (a frozen adapter stays frozen). With
        some layers on and others off there is no single state to restore: a warning, and all are on after it."""
        states = {m.disable_adapters for _, m in self.base_model.tuner_layers()}
        if len(states) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled; "
                          "after the disable_adapter context all of them will be enabled.")
        all_disabled = states == {True}
        snapshot = _requires_grad_snapshot(self)
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if not all_disabled:
                self.base_model.enable_adapter_layers()
            _restore_requires_grad(self, snapshot)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # --- save / load --------------------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str, safe_serialization: bool = True, selected_adapters: Optional[list[str]] = None,
        is_main_process: bool = True, state_dict: Optional[dict] = None, **kwargs,
    ) -> None:
        """Write each adapter as `adapter_config.json` + `adapter_model.safetensors` (non-default adapters in a
        sub-folder named after them, never outside `save_directory`). Each adapter's pair is one save: a reader of
        this package sees the old pair or the new one (`save_adapter_folder`); other files in the folder stay."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; expected a folder.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; available adapters: {sorted(self.peft_config)}.")
        folders = {name: adapter_folder(save_directory, name) for name in names}  # all checked before any write
        save_form = self.base_model.adapter_save_form(self, names, kwargs)  # upstream's save keywords, by tuner type
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.create_or_update_model_card(save_directory)
        for name in names:
            weights, config = self._adapter_state_dict_for_save(name, state_dict), self.peft_config[name]
            weights, config = save_form(name, weights, config)  # e.g. LoRA-GA's form for the original base
            save_adapter_folder(folders[name], weights, config, safe_serialization=safe_serialization,
                                write_config=lambda folder, config=config: self._save_config(config, folder))

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write (or update) `output_dir/README.md`: the card's metadata gets `library_name: peft`, the adapter's
        tags and `base_model`; a user's existing text and metadata are kept."""
        from .utils.other import update_model_card

        update_model_card(self, output_dir)

    def _adapter_state_dict_for_save(self, adapter_name: str, state_dict: Optional[dict]) -> dict:
        return get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=adapter_name)

    def _save_config(self, config: PeftConfig, folder: str) -> None:
        base = self.get_base_model()
        name_or_path = config.base_model_name_or_path or getattr(getattr(base, "config", None), "_name_or_path", None)
        inference_mode = config.inference_mode
        try:
            config.inference_mode = True
            config.base_model_name_or_path = name_or_path or None
            config.save_pretrained(folder)
        finally:
            config.inference_mode = inference_mode

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
        config: Optional[PeftConfig] = None, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
        **kwargs,
    ) -> "PeftModel":
        """Load a saved adapter onto `model`. On any error the model is left exactly as it was."""
        _refuse_peft_model(model, f"load_adapter({str(model_id)!r}, adapter_name=...)")
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        check_adapter_name(adapter_name)
        device, unpaired = kwargs.pop("torch_device", None), None
        if config is None:  # config and weights of one save; `unpaired` says when they are not
            config, weights, unpaired = load_adapter_pair(model_id, device=device, check_config=_tuner_class, **hub)
        else:
            _tuner_class(config)  # an unknown or unimplemented type fails before the weights are read
            weights = load_peft_weights(model_id, device=device, **hub)
        config.inference_mode = not is_trainable
        model_cls = cls
        if cls is PeftModel and config.task_type is not None:
            from .peft_model_tasks import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

            model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type.value, cls)
        snapshot = _requires_grad_snapshot(model)
        peft_model = model_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            peft_model._load_weights(weights, adapter_name, is_trainable, kwargs.get("ignore_mismatched_sizes", False),
                                     unpaired=unpaired)
        except Exception:  # put back every wrapped module (modules_to_save originals too), flag and hook
            peft_model.base_model.purge_adapter(model, adapter_name)
            model.__dict__.pop("peft_config", None)
            if peft_model._added_input_grad_hooks:
                model.disable_input_require_grads()
            _restore_requires_grad(model, snapshot)
            raise
        return peft_model

    def load_adapter(
        self, model_id: str, adapter_name: str, is_trainable: bool = False, torch_device: Optional[str] = None,
        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, **kwargs,
    ):
        """Load a saved adapter as `adapter_name` (replacing its weights if it exists). All-or-nothing. A new
        adapter is not made active; with `is_trainable=True` its weights require grad."""
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)  # skip them with a warning
        check_adapter_name(adapter_name)
        config, weights, unpaired = load_adapter_pair(model_id, device=torch_device, check_config=_tuner_class, **hub)
        config.inference_mode = not is_trainable
        if adapter_name in self.peft_config:
            from_saved = getattr(self.base_model, "adapter_from_saved", None)  # undoes adapter_to_save (LoRA-GA)
            weights, commit = from_saved(adapter_name, weights, config) if from_saved else (weights, None)
            result = self._load_weights(weights, adapter_name, is_trainable, ignore_mismatched_sizes, unpaired)
            if commit is not None:
                commit()
            return result
        snapshot = _requires_grad_snapshot(self)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                         autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            result = self._load_weights(weights, adapter_name, is_trainable, ignore_mismatched_sizes, unpaired)
            if is_trainable:
                self.set_requires_grad(adapter_name)
            return result
        except Exception:
            self._remove_adapter_quietly(adapter_name, snapshot)
            raise

    def _load_weights(self, weights: dict, adapter_name: str, is_trainable: bool, ignore_mismatched_sizes=False,
                      unpaired: Optional[str] = None):
        from .functional import materialize_adapter

        weights = convert_adapter_state_dict(self.get_base_model(), weights)  # transformers v5 renamed modules
        materialize_adapter(self.get_base_model(), adapter_name)  # low_cpu_mem_usage: meta -> zeros, then loaded
        result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name,
                                           ignore_mismatched_sizes=ignore_mismatched_sizes, unpaired=unpaired)
        if not is_trainable:
            self.base_model.set_requires_grad(adapter_name, requires_grad=False)
            self.eval()
        return result


def _refuse_peft_model(model: nn.Module, instead: str) -> None:
    """Wrapping a PeftModel (or PeftMixedModel) again would nest tuners and fail half-way: say what to call."""
    if isinstance(model, PeftModel):
        raise ValueError(
            f"The model is already a {type(model).__name__} (adapters {sorted(model.peft_config)}), so it cannot be "
            f"wrapped again: to add an adapter to it, call model.{instead} with a new adapter name; to start over "
            "from the base model without adapters, pass model.unload(). The model is unchanged."
        )


def _tuner_class(config: PeftConfig):
    if config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        if isinstance(config, PromptLearningConfig):
            raise not_implemented_error(config)
        raise ValueError(f"peft_type {config.peft_type!r} has no registered tuner; known: "
                         f"{sorted(p.value for p in PEFT_TYPE_TO_TUNER_MAPPING)}.")
    return PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]


def _requires_grad_snapshot(model: nn.Module) -> dict[int, tuple[torch.nn.Parameter, bool]]:
    return {id(p): (p, p.requires_grad) for p in model.parameters()}


def _restore_requires_grad(model: nn.Module, snapshot: dict) -> None:
    for param, flag in snapshot.values():
        param.requires_grad_(flag)


def _enable_input_grads(model: nn.Module) -> bool:
    """Make the input embeddings' output require grad (checkpointed blocks need it); True if hooks were added
    (none when transformers' hooks are already there)."""
    def hooked() -> bool:  # transformers 5 keeps a list of hooks, 4 a single one
        return bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))

    if not hasattr(model, "enable_input_require_grads") or hooked():
        return False
    model.enable_input_require_grads()
    return hooked() and hasattr(model, "disable_input_require_grads")


__all__ = ["PeftModel", "ModulesToSaveWrapper", "TunerLayerStatus", "TunerModelStatus", "get_layer_status",
           "get_model_status"]
