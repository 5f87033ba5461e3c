"""Adapter keys through transformers v5's checkpoint conversions.

transformers 5 loads checkpoints written for older module names by renaming their keys on the fly (ViT's
`encoder.layer.N.attention.attention.query` is `layers.N.attention.q_proj` in the v5 module tree, and many more;
`transformers.conversion_mapping`). An adapter saved against the older names must follow the same renaming:

- `build_peft_weight_mapping` is what transformers' own `load_adapter` calls: the model's conversions, preceded by
  the two renamings that turn an adapter file key into an in-memory key (`base_model.model.` dropped, the adapter
  name inserted after the tuner container: `...q_proj.lora_A.weight` -> `...q_proj.lora_A.<adapter>.weight`).
- `convert_adapter_state_dict` does the same for `PeftModel.from_pretrained` / `load_adapter`, on file keys.
- `legacy_module_names` maps each module of a v5 model to its checkpoint-format name, so that a config written
  against the old names (`target_modules=["query", "value"]`) still finds its modules (see `BaseTuner._inject`).

Only renamings are followed. Conversions that fuse or split weights (`WeightConverter`: fused MoE experts,
`qkv` fusions, chunked MLPs) change the shape of what a LoRA factor applies to; an adapter whose keys need one
does not load (a clear error from `set_peft_model_state_dict`, model unchanged).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Optional

from torch import nn

from .adapter_names import check_adapter_name

_WEIGHT_SUFFIX = ".weight"


def _tuner_prefixes(peft_config) -> list[str]:
    from ..registry import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(getattr(peft_config, "peft_type", None))
    return [prefix] if prefix else sorted(set(PEFT_TYPE_TO_PREFIX_MAPPING.values()))


def build_peft_weight_mapping(
    weight_conversions: Optional[list], adapter_name: str, peft_config=None
) -> list:
    """The conversions transformers applies to the keys of an adapter file, in order: drop `base_model.model.`,
    insert `adapter_name` after each tuner container (`lora_A`, `lora_embedding_B`, ...), then every renaming of
    the model's own mapping. The model's `WeightConverter`s are left out: they act on base weights, not on LoRA
    factors (see the module docstring)."""
    from transformers.core_model_loading import WeightRenaming

    check_adapter_name(adapter_name)
    mapping = [WeightRenaming(r"^base_model\.model\.", "")]
    for prefix in _tuner_prefixes(peft_config):
        # `(lora_A)` followed by `.weight` or the end of the key: `lora_A.weight` -> `lora_A.<adapter>.weight`
        mapping.append(WeightRenaming(rf"(?<=\.)({re.escape(prefix)}[A-Za-z0-9_]*)(?=\.weight$|\.bias$|$)",
                                      rf"\1.{adapter_name}"))
    mapping.extend(c for c in (weight_conversions or []) if isinstance(c, WeightRenaming))
    return mapping


def _conversions(model: nn.Module) -> list:
    """transformers' load-time conversions for `model` (empty for a model it has none for, or transformers < 5)."""
    if "transformers" not in sys.modules:  # then `model` is no transformers model: don't pay for the import
        return []
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    return get_model_conversion_mapping(model, add_legacy=False)


def _renamings(model: nn.Module, reverse: bool) -> list:
    """The model's key renamings in the order transformers applies them (reversed and inverted for `reverse`)."""
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    conversions = [c for c in _conversions(model)
                   if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)]
    if not reverse:
        return conversions
    inverted = []
    for conversion in reversed(conversions):
        try:
            inverted.append(conversion.reverse_transform())
        except (ValueError, NotImplementedError):  # a renaming transformers cannot invert either
            continue
    return inverted


def _rename(key: str, renamings: list) -> str:
    for renaming in renamings:
        key, _ = renaming.rename_source_key(key)
    return key


def legacy_module_names(model: nn.Module) -> dict[str, str]:
    """`{module name in the model: its name in the checkpoint format}` for every module whose weight
    transformers renames on load (empty for most models). Read from parameter keys, as the renamings are written
    for them."""
    renamings = _renamings(model, reverse=True)
    if not renamings:
        return {}
    legacy = {}
    for name, module in model.named_modules():
        if not name or getattr(module, "weight", None) is None:
            continue
        old = _rename(name + _WEIGHT_SUFFIX, renamings)
        if old.endswith(_WEIGHT_SUFFIX) and old[: -len(_WEIGHT_SUFFIX)] != name:
            legacy[name] = old[: -len(_WEIGHT_SUFFIX)]
    return legacy


def convert_adapter_state_dict(model: nn.Module, state_dict: dict[str, Any],
                               prefix: str = "base_model.model.") -> dict[str, Any]:
    """Adapter file keys (`base_model.model.<path>...`) renamed the way transformers renames the base model's
    keys, for each key whose module path is not in `model` but whose renamed path is. `model` is the plain
    transformers model (not the `PeftModel`); keys already in the model's naming are kept as they are."""
    conversions = _conversions(model)
    if not conversions:
        return state_dict
    renamings = _renamings(model, reverse=False)
    modules = {name for name, _ in model.named_modules()}
    out = {}
    for key, value in state_dict.items():
        new_key = _convert_key(key, prefix, renamings, modules)
        _refuse_fused(new_key[len(prefix):] if new_key.startswith(prefix) else new_key, modules, renamings,
                      conversions)
        out[new_key] = value
    return out


def _refuse_fused(path: str, modules: set[str], renamings: list, conversions: list) -> None:
    """A key whose module transformers fuses into another tensor on load (MoE experts stacked into one 3-D
    parameter, `q`/`k`/`v` concatenated) cannot be loaded as a LoRA layer: say so, naming the key."""
    from transformers.core_model_loading import WeightConverter

    if _owning_module(path, modules) is not None:
        return
    parts = path.split(".")
    for cut in (len(parts) - 2, len(parts) - 1):
        probe = _rename(".".join(parts[:cut]) + _WEIGHT_SUFFIX, renamings)
        for converter in (c for c in conversions if isinstance(c, WeightConverter)):
            renamed, pattern = converter.rename_source_key(probe)
            if pattern is not None:
                raise ValueError(
                    f"Adapter key {path!r} adapts {probe[: -len(_WEIGHT_SUFFIX)]!r}, which transformers fuses into "
                    f"{renamed!r} when it loads this model (a WeightConverter, e.g. stacked MoE experts); a LoRA "
                    "factor cannot follow that fusion here (LoRA on fused parameters, `target_parameters`, is not "
                    "implemented). Load the adapter with the transformers version it was trained with, or merge it."
                )


def _convert_key(key: str, prefix: str, renamings: list, modules: set[str]) -> str:
    if not key.startswith(prefix):
        return key
    path = key[len(prefix):]
    owner = _owning_module(path, modules)
    if owner is not None:  # already in this model's naming
        return key
    renamed = _rename(path, renamings)
    return prefix + renamed if _owning_module(renamed, modules) is not None else key


def _owning_module(path: str, modules: set[str]) -> Optional[str]:
    """The module (of `modules`) a file key's path is under, skipping the tuner container and parameter name:
    `a.b.lora_A.weight` -> `a.b` when `a.b` is a module; None when none of its dotted prefixes of length >= 1
    leaves exactly a container + parameter (or a parameter) behind."""
    parts = path.split(".")
    for cut in (len(parts) - 2, len(parts) - 1):  # `<module>.lora_A.weight`, `<module>.lora_embedding_A`
        if cut > 0 and ".".join(parts[:cut]) in modules:
            return ".".join(parts[:cut])
    return None
