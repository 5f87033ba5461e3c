"""`SoraModel`: injects SoRA layers according to a `SoraConfig`; the gate's proximal step and compaction."""

from __future__ import annotations

import re
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..target_matching import all_linear_names, pattern_value
from ..tuners_utils import BaseTuner
from .config import SoraConfig
from .functional import proximal_gate_step, sora_scaling
from .layer import Linear, SoraLayer


class SoraModel(BaseTuner):
    """The tuner model for SoRA: `PeftModel.base_model` is one of these, and its `.model` the wrapped model.

    Training: after each optimizer step call `apply_gate_proximal(lr)` (or use `SoraGateProximal`); after training
    `compact()` drops the switched-off rank components and records each module's rank in `rank_pattern`."""

    prefix: str = "sora_"
    tuner_layer_cls = SoraLayer

    def _prepare_adapter_config(self, config: SoraConfig, model_config: dict) -> SoraConfig:
        if config.target_modules is None:
            model_type = model_config.get("model_type")
            defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
            if defaults is None:
                raise ValueError(f"Invalid target_modules=None for model_type {model_type!r}: there is no default; "
                                 "expected a list of module names, a regex, or 'all-linear'.")
            config.target_modules = set(defaults)
        elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            config.target_modules = all_linear_names(self.model)
        return config

    def _layer_kwargs(self, config: SoraConfig, key: str) -> dict:
        return {
            "r": pattern_value(key, config.rank_pattern or {}, config.r),
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "scaling": sora_scaling(config.lora_alpha, config.r),  # the adapter's scale, whatever the module's rank
            "gate_init": config.gate_init,
            "init_sora_weights": config.init_sora_weights,
        }

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        kwargs = self._layer_kwargs(config, current_key)
        if isinstance(target, SoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, nn.Module) and hasattr(target, "base_layer"):
            raise ValueError(f"Invalid target {current_key!r}: it is an adapter layer of another type "
                             f"({type(target).__name__}); expected an nn.Linear or Conv1D.")
        fan_in_fan_out = _fan_in_fan_out(target, config.fan_in_fan_out, current_key)
        setattr(parent, target_name, Linear(target, adapter_name, fan_in_fan_out=fan_in_fan_out, **kwargs))

    # --- gates --------------------------------------------------------------------------------------------------
    def _sora_layers(self, adapter_name: str) -> list[tuple[str, SoraLayer]]:
        return [(k, m) for k, m in self.tuner_layers() if isinstance(m, SoraLayer) and adapter_name in m.sora_gate]

    def _names(self, adapter_names: Optional[Union[str, list[str]]]) -> list[str]:
        names = self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        self._check_known(names)
        return names

    @torch.no_grad()
    def apply_gate_proximal(
        self, lr: float, sparsity_lambda: Optional[float] = None, adapter_names: Optional[list[str]] = None,
    ) -> int:
        """The proximal map of the L1 penalty on every gate of the named (default: active) adapters,
        `g <- T_{lr * lambda}(g)` (soft thresholding; `lambda` defaults to each adapter's `sparsity_lambda`). Call
        it after the optimizer step that took the smooth step on the gates, with that step's learning rate.
        Returns how many gate entries are exactly zero afterwards."""
        zeros = 0
        for name in self._names(adapter_names):
            lam = self.peft_config[name].sparsity_lambda if sparsity_lambda is None else sparsity_lambda
            for _, layer in self._sora_layers(name):
                gate = layer.sora_gate[name]
                gate.copy_(proximal_gate_step(gate, lr, lam))
                zeros += int((gate == 0).sum())
        return zeros

    def gate_ranks(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Module name -> number of live (non-zero) gate entries of `adapter_name` (default: the active one)."""
        name = self._names(adapter_name)[0]
        return {key: layer.live_rank(name) for key, layer in self._sora_layers(name)}

    def compact(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Prune the rank components whose gate is exactly zero from every layer of `adapter_name` (default: the
        active one) and record each module's new rank in its config's `rank_pattern` (full module names, escaped),
        so that `save_pretrained` / `from_pretrained` rebuild the compacted shapes. Outputs are unchanged (the scale
        stays `lora_alpha / r`). A module with no live component keeps one zero component. Returns the ranks.
        An optimizer built before compaction holds the old tensors: build a new one to train further."""
        name = self._names(adapter_name)[0]
        layers = self._sora_layers(name)
        merged = [key for key, layer in layers if name in layer.merged_adapters]
        if merged:
            raise ValueError(f"Invalid adapter_name={name!r}: it is merged in {merged[:3]}; unmerge before compacting.")
        ranks = {key: layer.compact(name) for key, layer in layers}
        config = self.peft_config[name]
        config.rank_pattern = {re.escape(k): r for k, r in ranks.items()}  # every module named: old patterns go
        return ranks


def _fan_in_fan_out(target: nn.Module, wanted: bool, key: str) -> bool:
    """Conv1D stores W as (in, out): fan_in_fan_out must be True there and False for nn.Linear (warned, fixed)."""
    is_conv1d = type(target).__name__ == "Conv1D"
    if is_conv1d and not wanted:
        warnings.warn(f"{key!r} is a Conv1D (weight stored in x out): setting fan_in_fan_out=True for it.")
        return True
    if isinstance(target, nn.Linear) and wanted:
        warnings.warn(f"{key!r} is an nn.Linear: setting fan_in_fan_out=False for it.")
        return False
    return wanted
