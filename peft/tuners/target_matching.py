"""Which modules a config targets: names, regexes, "all-linear", layer indices, exclusions and patterns."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

_LINEAR_TYPE_NAMES = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")


def _matches_names(key: str, names: Union[str, Iterable[str], None]) -> bool:
    """A string is a regex matched against the whole key; a list matches the key or its dotted suffix."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == name or key.endswith("." + name) for name in names)


def layer_index(key: str, layers_pattern: Union[str, list[str], None]) -> Optional[int]:
    """The transformer-block index in a module key, e.g. 3 in `model.layers.3.self_attn.q_proj`: the *first*
    numbered segment (so `model.layers.1.mlp.experts.0.w1` gives 1, not the expert index 0). A layers_pattern is a
    regex naming the block list (e.g. "layers" or "h"); it may start the key. Empty means any name."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    patterns = [p for p in patterns if p]
    regexes = [rf"(?:^|.*?\.)(?:{p})\.(\d+)\." for p in patterns] or [r".*?\.[^.]*\.(\d+)\."]
    for regex in regexes:
        found = re.match(regex, key)
        if found:
            return int(found.group(1))
    return None


def is_target(config, key: str) -> bool:
    """True when the module named `key` is adapted under `config` (a LoraConfig-like object)."""
    if _matches_names(key, getattr(config, "exclude_modules", None)):
        return False
    if not _matches_names(key, config.target_modules):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, (list, tuple)) and not wanted):  # [] means every layer (upstream)
        return True
    index = layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index in ([wanted] if isinstance(wanted, int) else wanted)


def pattern_value(key: str, patterns: dict, default):
    """First pattern of `patterns` (regex on a dotted suffix of `key`) that matches; else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def all_linear_names(model: nn.Module) -> set[str]:
    """Last name components of every linear layer except the output layer (the `"all-linear"` shorthand)."""
    output = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output = None
    names, output_names = set(), set()
    for key, module in model.named_modules():
        if _inside_adapter_machinery(key):
            continue
        if type(module).__name__ in _LINEAR_TYPE_NAMES or isinstance(module, nn.Linear):
            if module is output:
                output_names.add(key.split(".")[-1])
            else:
                names.add(key.split(".")[-1])
    return names - output_names


_MACHINERY = ("base_layer", "original_module", "modules_to_save", "token_adapter")


def _inside_adapter_machinery(key: str) -> bool:
    return any(part in _MACHINERY or part.startswith("lora_") for part in key.split("."))
