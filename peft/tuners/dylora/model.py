"""`DyLoRAModel`: injects DyLoRA layers according to a `DyLoRAConfig`; `set_rank` picks the rank used outside
training (and by merging)."""

from __future__ import annotations

from typing import Optional

from ..krona.model import fill_default_targets
from ..tuners_utils import BaseTuner
from .layer import DyLoRALayer, Linear
from .rank_math import RankSampler


class DyLoRAModel(BaseTuner):
    """The tuner model for DyLoRA. All layers of one adapter share one `RankSampler` (one rank per step)."""

    prefix: str = "dylora_"
    tuner_layer_cls = DyLoRALayer

    def _prepare_adapter_config(self, config, model_config: dict):
        return fill_default_targets(self.model, config, model_config, "DyLoRA")

    def _sampler(self, config, adapter_name: str) -> RankSampler:
        samplers = self.__dict__.setdefault("_rank_samplers", {})
        if adapter_name not in samplers:
            samplers[adapter_name] = RankSampler(config.r_min, config.r, config.rank_seed)
        return samplers[adapter_name]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        kwargs = {"r": config.r, "r_min": config.r_min, "lora_alpha": config.lora_alpha,
                  "lora_dropout": config.lora_dropout, "update_mode": config.update_mode,
                  "eval_rank": config.eval_rank, "init_lora_weights": config.init_lora_weights,
                  "fixed_scale": config.fixed_scale,
                  "sampler": self._sampler(config, adapter_name)}
        if isinstance(target, DyLoRALayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            setattr(parent, target_name, Linear(target, adapter_name, fan_in_fan_out=config.fan_in_fan_out, **kwargs))

    def forward_context(self, peft_model, kwargs: dict, generate: bool = False):
        """`PeftModel.forward` in training mode starts a step: each active adapter draws its rank once."""
        context = super().forward_context(peft_model, kwargs, generate)
        if self.model.training and not generate:
            samplers = self.__dict__.get("_rank_samplers", {})
            for name in self.active_adapters:
                if name in samplers:
                    samplers[name].start_step()
        return context

    def rank_sampler(self, adapter_name: str = "default") -> RankSampler:
        """The sampler of `adapter_name` (its `fixed` attribute pins the training rank)."""
        self._check_known(adapter_name)
        return self.__dict__["_rank_samplers"][adapter_name]

    def set_rank(self, rank: int, adapter_name: Optional[str] = None) -> None:
        """Use rank `rank` (1 <= rank <= r) outside training and for merging, for `adapter_name` (None: the active
        adapters); the config's `eval_rank` follows, so a save records it. Checked on every layer before any
        change; refused while merged at another rank."""
        names = self.active_adapters if adapter_name is None else [adapter_name]
        self._check_known(names)
        layers = [layer for _, layer in self.tuner_layers() if isinstance(layer, DyLoRALayer)]
        for name in names:
            r = self.peft_config[name].r
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
                raise ValueError(f"Invalid rank={rank!r} for adapter {name!r}: expected an int in [1, {r}].")
            if any(name in layer.merged_adapters and layer._merged_rank.get(name) != rank for layer in layers):
                raise ValueError(f"Invalid rank={rank} for adapter {name!r}: it is merged at another rank; "
                                 "unmerge it first.")
        for name in names:
            for layer in layers:
                if name in layer.dylora_A:
                    layer.set_rank(name, rank)
            self.peft_config[name].eval_rank = rank

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.__dict__.get("_rank_samplers", {}).pop(adapter_name, None)
