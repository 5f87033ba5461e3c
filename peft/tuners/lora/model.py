"""`LoraModel`: injects LoRA layers into a model according to a `LoraConfig`."""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ...utils.other import get_submodules
from ..target_matching import all_linear_names, pattern_value
from ..tuners_utils import BaseTuner
from .dispatch import create_lora_module
from .hooks import lora_init_hook, save_form_provider
from .layer import LoraLayer


class LoraModel(BaseTuner):
    """The tuner model for LoRA: `PeftModel.base_model` is one of these, and its `.model` the wrapped model."""

    prefix: str = "lora_"
    tuner_layer_cls = LoraLayer

    def _prepare_adapter_config(self, config, model_config: dict):
        return prepare_lora_config(self.model, config, model_config)

    def _layer_kwargs(self, config, key: str) -> dict:
        r = pattern_value(key, config.rank_pattern or {}, config.r)
        return {
            "r": r,
            "lora_alpha": pattern_value(key, config.alpha_pattern or {}, config.lora_alpha),
            "lora_dropout": config.lora_dropout,
            "fan_in_fan_out": config.fan_in_fan_out,
            "init_lora_weights": (  # these are applied by _init_adapter_weights, which has the config
                False if config.init_lora_weights == "loftq" or lora_init_hook(config.init_lora_weights)
                else config.init_lora_weights),
            "use_rslora": config.use_rslora,
            # only when set, so that layer types without DoRA / lora_bias keep their signature
            **{k: True for k in ("use_dora", "lora_bias") if getattr(config, k, False)},
        }

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        kwargs = self._layer_kwargs(config, current_key)
        if isinstance(target, LoraLayer):
            kwargs.pop("fan_in_fan_out")
            target.update_layer(adapter_name, **kwargs)
            layer = target
        else:
            layer = create_lora_module(target, adapter_name, config, current_key, **kwargs)
            setattr(parent, target_name, layer)
        self._init_adapter_weights(layer, config, adapter_name, current_key)

    def inject_adapter(self, model: nn.Module, adapter_name: str) -> None:
        hook = lora_init_hook(self.peft_config[adapter_name].init_lora_weights)
        with nullcontext() if hook is None or hook.around_injection is None else hook.around_injection(self):
            super().inject_adapter(model, adapter_name)

    def _init_needs_real_weights(self, config) -> bool:
        return config.init_lora_weights not in (True, False, "gaussian")

    def adapter_save_form(self, peft_model: nn.Module, adapter_names: list[str], kwargs: dict):
        """The form `save_pretrained` writes each adapter in, from upstream's save keywords (`hooks.py`)."""
        provider = save_form_provider()
        if provider is None:
            return super().adapter_save_form(peft_model, adapter_names, kwargs)
        return provider(peft_model, adapter_names, kwargs)

    def _inject_parameters(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        from .param_wrapper import inject_target_parameters
        from .tying import tie_lora_targets

        def create(key: str) -> None:  # a module tied to the input embedding: its factors become the embedding's
            parent, target, name = get_submodules(model, key)
            with self._creation_device(config):
                self._create_and_replace(config, adapter_name, target, name, parent, current_key=key)

        tied = tie_lora_targets(model, config, adapter_name, create)
        known = getattr(self, "targeted_module_names", [])
        self.targeted_module_names = known + [k for k in tied if k not in known]
        return inject_target_parameters(self, model, config, adapter_name)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for _, layer in self.tuner_layers():  # trainable-token wrappers refuse overlapping rows before any change
            if hasattr(layer, "check_set_adapter"):
                layer.check_set_adapter(names)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _wrap_modules_to_save(self, model: nn.Module, config, adapter_name: str) -> None:
        from .tying import tie_modules_to_save

        super()._wrap_modules_to_save(model, config, adapter_name)
        tie_modules_to_save(model, config, adapter_name)  # ensure_weight_tying: tied copies share the embedding's

    def _check_same_target_parameters(self, config) -> None:
        """Adapters with `target_parameters` must all target the same parameters (their wrappers nest in one order)."""
        wanted = set(getattr(config, "target_parameters", None) or [])
        for name, other in self.peft_config.items():
            theirs = set(getattr(other, "target_parameters", None) or [])
            if other is not config and wanted and theirs and theirs != wanted:
                raise ValueError(
                    f"Invalid target_parameters={sorted(wanted)}: adapter {name!r} targets {sorted(theirs)}; "
                    "all adapters must target the same set of parameters (their wrappers nest in one order)."
                )

    def _init_adapter_weights(self, layer: LoraLayer, config, adapter_name: str, key: str) -> None:
        """Hook for data-driven initialisations (LoRA-GA); plain LoRA keeps the layer's own init."""
        hook = lora_init_hook(config.init_lora_weights)  # e.g. "lora_ga", registered by peft.tuners.loraga
        if hook is not None:
            hook.init_layer(self, layer, config, adapter_name, key)
        elif config.init_lora_weights == "loftq":  # needs config.loftq_config, which the layer does not see
            from .init_methods import loftq_layer

            loftq_layer(layer, adapter_name, config.loftq_config)

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        self._check_same_target_parameters(config)
        from .init_methods import warn_if_base_changing

        warn_if_base_changing(self.peft_config.values())

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", **kwargs) -> None:
        """A new adapter combining `adapters` with `weights` (see `peft.tuners.lora.weighted`)."""
        from .weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    def forward_context(self, peft_model: nn.Module, kwargs: dict, generate: bool = False):
        """`adapter_names=[...]` (popped from `kwargs`): one adapter per sample (`.mixed_batch`)."""
        from .mixed_batch import per_sample_adapters

        return per_sample_adapters(peft_model, kwargs, generate)

    def _enable_peft_forward_hooks(self, *args, adapter_names=None, num_beams=None, **kwargs):
        """Context for a forward/generate with one adapter per sample (`adapter_names`; see `.mixed_batch`)."""
        from .mixed_batch import mixed_adapter_context

        return nullcontext() if adapter_names is None else mixed_adapter_context(self, adapter_names, num_beams)

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        """A layer nesting another LoRA layer (`MultiheadAttention`'s out_proj) unloads both itself first."""
        self._check_known(adapter_names)
        for key, layer in self.tuner_layers():
            if hasattr(layer, "unload_and_optionally_merge_module"):
                parent, _, name = get_submodules(self.model, key)
                setattr(parent, name, layer.unload_and_optionally_merge_module(merge, safe_merge, adapter_names))
        return super()._unload(merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            parts = name.split(".")
            if not any(p.startswith(self.prefix) or p == "modules_to_save" for p in parts):
                param.requires_grad_(False)
        for adapter in self.active_adapters:
            if self.peft_config[adapter].inference_mode:  # a frozen (inference) adapter trains no bias either
                continue
            bias = self.peft_config[adapter].bias
            if bias == "all":
                for name, param in model.named_parameters():
                    if name.endswith("bias") and "original_module" not in name:
                        param.requires_grad_(True)
            elif bias == "lora_only":
                for _, layer in self.tuner_layers():
                    base_bias = getattr(layer.get_base_layer(), "bias", None)
                    if base_bias is not None:
                        base_bias.requires_grad_(True)


def prepare_lora_config(model: nn.Module, config, model_config: dict):
    """`config` with `target_modules` filled in for `model` (the architecture's default, or "all-linear" expanded),
    after planning the weight tying it asks for; also what LoRA-GA's estimation uses to find the targets."""
    from .tying import plan_weight_tying

    plan_weight_tying(model, config)  # ensure_weight_tying (upstream: before the defaults are filled in)
    if config.target_modules is None:
        model_type = model_config.get("model_type")
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if defaults is None and getattr(config, "target_parameters", None):
            return config  # only parameters are adapted
        if defaults is None:
            raise ValueError(
                f"target_modules is None and there is no default for model_type {model_type!r}. Please specify "
                "`target_modules` (a list of names, a regex, or 'all-linear')."
            )
        config.target_modules = set(defaults)
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = all_linear_names(model)
    return config
