"""`TiedLoraModel`: injects Tied-LoRA layers and owns the tied A / B of each (out, in) shape group."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..tuners_utils import BaseTuner
from ..vera.layer import adapter_dtype, linear_features
from ..vera.model import prepare_targets
from .layer import Linear, TiedLoraLayer
from .tied_math import shape_group


def init_tied_pair(r: int, in_features: int, out_features: int, zero_B: bool, device, dtype):
    """A (r, in) Kaiming-uniform as LoRA's (`a = sqrt(5)`: bound `1 / sqrt(in)`); B (out, r) zero, or uniform with
    bound `1 / sqrt(r)` when the vector v (initialised to 0) must be the one that starts the update."""
    A = torch.empty(r, in_features, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = torch.zeros(out_features, r, device=device, dtype=dtype)
    if not zero_B:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return A, B


class TiedLoraModel(BaseTuner):
    """The tuner model for Tied-LoRA. `tied_A[adapter][group]` (r x in) and `tied_B[adapter][group]` (out x r) are
    shared by every adapted layer of that (out, in) shape (`group = "<out>x<in>"`); they are created, always with
    real storage on the base layer's device, by the first layer of their group."""

    prefix: str = "tied_"
    tuner_layer_cls = TiedLoraLayer
    uses_shared_state = True

    def _prepare_adapter_config(self, config, model_config: dict):
        return prepare_targets(self.model, config, model_config, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                               "Tied-LoRA")

    def _inject(self, model: nn.Module, adapter_name: str) -> None:
        if "tied_A" not in self._modules:
            self.tied_A, self.tied_B = nn.ModuleDict(), nn.ModuleDict()
        super()._inject(model, adapter_name)

    def _ensure_pair(self, config, adapter_name: str, base: nn.Module) -> None:
        in_features, out_features = linear_features(base)
        group = shape_group(in_features, out_features)
        if adapter_name not in self.tied_A:
            self.tied_A[adapter_name], self.tied_B[adapter_name] = nn.ParameterDict(), nn.ParameterDict()
        if group in self.tied_A[adapter_name]:
            return
        weight = base.weight
        device = torch.device("cpu") if weight.is_meta else weight.device  # explicit: never on meta
        zero_B = config.init_weights and not config.train_scalings
        A, B = init_tied_pair(config.r, in_features, out_features, zero_B, device, adapter_dtype(base))
        self.tied_A[adapter_name][group] = nn.Parameter(A, requires_grad=config.train_shared)
        self.tied_B[adapter_name][group] = nn.Parameter(B, requires_grad=config.train_shared)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        base = target.get_base_layer() if isinstance(target, TiedLoraLayer) else target
        if linear_features(base) is None:
            raise ValueError(f"Invalid target module {current_key!r} of type {type(base).__name__}: Tied-LoRA adapts "
                             "only torch.nn.Linear and transformers' Conv1D.")
        self._ensure_pair(config, adapter_name, base)
        if isinstance(target, TiedLoraLayer):
            target.update_layer(adapter_name, config)
            return
        layer = Linear(target, (self.tied_A, self.tied_B), adapter_name, config)
        setattr(parent, target_name, layer)

    def _drop_pairs(self, adapter_name: str) -> None:
        for store in (self._modules.get("tied_A"), self._modules.get("tied_B")):
            if store is not None and adapter_name in store:
                del store[adapter_name]

    def purge_adapter(self, model: nn.Module, adapter_name: str) -> None:
        super().purge_adapter(model, adapter_name)
        self._drop_pairs(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_pairs(adapter_name)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """The tied pairs, once each: `tied_A.<group>` / `tied_B.<group>` (under `base_model.` in a PeftModel's
        file), trained or frozen (a frozen random pair cannot be drawn again)."""
        out = {}
        for attr in ("tied_A", "tied_B"):
            store = self._modules.get(attr)
            if store is None or adapter_name not in store:
                continue
            for group in store[adapter_name].keys():
                out[f"{attr}.{group}"] = f"{attr}.{adapter_name}.{group}"
        return out
