"""`AdaLoraModel`: injects AdaLoRA layers, adds the orthogonality penalty to the loss, and runs the rank allocator."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..target_matching import all_linear_names
from ..tuners_utils import BaseTuner
from .allocation import orthogonality_penalty
from .allocator import RankAllocator, masks_by_path
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear
from .saving import adapter_to_save, expand_triplets

# Default targets per transformers model type (upstream's table for AdaLoRA).
DEFAULT_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


class AdaLoraModel(BaseTuner):
    """AdaLoRA (Zhang et al., ICLR 2023) on the `nn.Linear`, transformers `Conv1D` and `nn.Conv2d` modules the
    config targets. One adapter at a time may train (the others need `inference_mode=True`).

    Training loop: after `loss.backward()` and `optimizer.step()`, before `zero_grad()`, call
    `model.base_model.update_and_allocate(step)` (a `PeftModel` forwards the attribute). While the wrapped model
    returns a `loss`, `forward` adds `orth_reg_weight * penalty` to it (see `allocation.orthogonality_penalty`).
    """

    prefix = "lora_"
    tuner_layer_cls = AdaLoraLayer
    module_pattern_fields = ()  # rank_pattern holds the kept triplets per parameter (`<path>.lora_E.<adapter>`)

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 state_dict: Optional[dict] = None) -> None:
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        self.rankallocator: Optional[RankAllocator] = None

    # --- configuration and injection ----------------------------------------------------------------------------
    @property
    def trainable_adapter_name(self) -> Optional[str]:
        """The one adapter not in inference mode (None when all are frozen)."""
        names = [n for n, c in self.peft_config.items() if not c.inference_mode]
        return names[0] if names else None

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError(f"{type(self).__name__} supports only 1 trainable adapter, got {trainable}. When using "
                             "multiple adapters, set inference_mode to True for all adapters except the one you want "
                             "to train.")

    def _prepare_adapter_config(self, config, model_config: dict):
        if config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(f"target_modules is None and AdaLoRA has no default for model_type {model_type!r}; "
                                 "expected target_modules (a list of names, a regex, or 'all-linear').")
            defaults = DEFAULT_TARGETS[model_type]
            config.target_modules = defaults if isinstance(defaults, str) else set(defaults)
        elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            config.target_modules = all_linear_names(self.model)
        return config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        r, ranknum = config.init_r, None
        mask = masks_by_path(config.rank_pattern, adapter_name).get(current_key)
        if mask is not None:  # a saved adapter after allocation: its kept triplets, at the initial scale
            r, ranknum = int(sum(mask)), config.init_r
        kwargs = dict(r=r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights=config.init_lora_weights, ranknum=ranknum)
        if isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        setattr(parent, target_name, self._new_layer(config, adapter_name, target, **kwargs))

    @staticmethod
    def _new_layer(config, adapter_name: str, target: nn.Module, **kwargs) -> AdaLoraLayer:
        conv1d = _conv1d_type()
        if isinstance(target, nn.Conv2d):
            return SVDConv2d(target, adapter_name, **kwargs)
        if isinstance(target, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                              "fan_in_fan_out to False.")
                config.fan_in_fan_out = False
            return SVDLinear(target, adapter_name, fan_in_fan_out=False, **kwargs)
        if conv1d is not None and isinstance(target, conv1d):
            if not config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting "
                              "fan_in_fan_out to True.")
                config.fan_in_fan_out = True
            return SVDLinear(target, adapter_name, fan_in_fan_out=True, **kwargs)
        raise ValueError(f"Target module {target} is not supported by AdaLoRA: expected `torch.nn.Linear`, "
                         "transformers `Conv1D` or `torch.nn.Conv2d`.")

    def _layers(self) -> dict[str, AdaLoraLayer]:
        """`{module path: layer}` of the layers that hold the trainable adapter."""
        name = self.trainable_adapter_name
        return {path: layer for path, layer in self.tuner_layers()
                if isinstance(layer, AdaLoraLayer) and name in layer.lora_A}

    # --- training -----------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The wrapped model's output; when it has a `loss` tensor and an adapter trains (enabled), the loss gets
        `orth_reg_weight * orthogonality_penalty` of that adapter's factors added (upstream's behaviour)."""
        outputs = self.model.forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        if not isinstance(loss, torch.Tensor) or name is None or not self.peft_config[name].orth_reg_weight:
            return outputs
        layers = self._layers()
        if not layers or all(layer.disable_adapters for layer in layers.values()):
            return outputs
        penalty = orthogonality_penalty([(layer.lora_A[name], layer.lora_B[name]) for layer in layers.values()])
        outputs.loss = loss + self.peft_config[name].orth_reg_weight * penalty.to(loss.device, loss.dtype)
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance EMAs and mask to the step's budget (call after `optimizer.step()`, before
        `zero_grad()`). Up to `total_step - tfinal` the budget follows the cubic schedule; at that step the final
        mask is fixed in `config.rank_pattern`; after it the same mask is applied again at every step."""
        name = self.trainable_adapter_name
        if name is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter; every adapter is in inference "
                             "mode.")
        config, layers = self.peft_config[name], self._layers()
        if self.rankallocator is None or self.rankallocator.adapter_name != name:
            self.rankallocator = RankAllocator(layers, config, name)
        allocator, end = self.rankallocator, config.total_step - config.tfinal
        if global_step < end:
            allocator.update_ipt(layers)
            budget, mask_now = allocator.budget_schedule(global_step)
            if mask_now:
                config.rank_pattern = allocator.mask_to_budget(layers, budget)
        elif global_step == end:
            config.rank_pattern = allocator.mask_to_budget(layers, allocator.target_budget)
            allocator.reset_ipt()
        elif config.rank_pattern:
            allocator.mask_using_rank_pattern(layers, config.rank_pattern)

    # --- saving and unloading -----------------------------------------------------------------------------------
    def adapter_save_form(self, peft_model: nn.Module, adapter_names: list[str], kwargs: dict):
        """The saved form: only the kept triplets when an adapter's config has a rank pattern (see `saving.py`);
        upstream's save keywords are checked as for every tuner type."""
        super().adapter_save_form(peft_model, adapter_names, kwargs)
        return adapter_to_save

    def adapter_from_saved(self, adapter_name: str, weights: dict, config):
        """Loading a file with a rank pattern into the existing adapter `adapter_name`: layers still at `init_r`
        get the kept triplets back in place (zeros elsewhere); once loaded, the adapter's config takes the file's
        rank pattern (so a later save writes the same ranks)."""
        masks = masks_by_path(config.rank_pattern, adapter_name)
        if not masks:
            return weights, None
        ranks = {path: layer.r[adapter_name] for path, layer in self.tuner_layers()
                 if isinstance(layer, AdaLoraLayer) and adapter_name in layer.r}
        live = self.peft_config[adapter_name]

        def commit() -> None:
            live.rank_pattern = {f"{path}.lora_E.{adapter_name}": mask for path, mask in masks.items()}

        return expand_triplets(weights, masks, ranks), commit

    def add_weighted_adapter(self, *args, **kwargs):
        """Not supported for AdaLoRA (upstream's behaviour); use LoRA."""
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")
