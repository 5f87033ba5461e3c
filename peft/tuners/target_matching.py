"""Which modules a config targets: names, regexes, "all-linear", layer indices, exclusions and patterns."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

from ._buffer_dict import BufferDict

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
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or (isinstance(wanted, (list, tuple)) and not wanted):  # [] means every layer (upstream)
        return True
    index = layer_index(key, getattr(config, "layers_pattern", None))
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
    """True for a module name inside a tuner layer or wrapper: a part names the wrapped module, a `modules_to_save`
    copy, or starts with a registered tuner type's prefix (`peft.registry.adapter_prefixes`)."""
    from ..registry import adapter_prefixes

    prefixes = adapter_prefixes()
    return any(part in _MACHINERY or part.startswith(prefixes) for part in key.split("."))


# --- upstream's matching entry point ----------------------------------------------------------------------------
class _Excluded:
    """Falsy answer of `check_target_module_exists` for a module that matched but is excluded (by `exclude_modules`
    or because it is, or lies inside, a `modules_to_save` module); a plain `False` means "not targeted"."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "EXCLUDED"


EXCLUDED = _Excluded()


def _inside_any(key: str, names) -> bool:
    """True when some contiguous run of `key`'s dotted parts equals one of `names` (the module or one above it)."""
    parts = key.split(".")
    wanted = set(names)
    return any(".".join(parts[i:j]) in wanted for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))


def check_target_module_exists(config, key: str):
    """Whether the module named `key` is adapted under `config` (upstream's public helper): True or False, or the
    falsy `EXCLUDED` when `exclude_modules` or `modules_to_save` rules it out."""
    if _matches_names(key, getattr(config, "exclude_modules", None)):
        return EXCLUDED
    if _inside_any(key, getattr(config, "modules_to_save", None) or []):
        return EXCLUDED
    if config.target_modules is None:  # only target_parameters (or nothing) is set
        return False
    return is_target(config, key)


# --- compressing long target lists -------------------------------------------------------------------------------
def _suffixes(name: str) -> list[str]:
    """Dotted suffixes of `name`, shortest first: "a.b.c" -> ["c", "b.c", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def minimal_target_suffixes(target_modules, other_module_names) -> set[str]:
    """The shortest dotted suffixes that select exactly `target_modules` among `target_modules + other_module_names`
    under suffix matching (a name `n` selects key `k` when `k == n` or `k` ends with `"." + n`).

    Each target contributes its shortest suffix that is no suffix of any other module name; targets sharing that
    suffix collapse into one entry. When a target has no such suffix (it is itself a dotted suffix of another
    module's name), no suffix list can tell them apart and the targets come back unchanged, as a set.
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules should be a list or set of strings (non-empty), got {target_modules!r}.")
    targets = set(target_modules)
    if "" in targets:
        raise ValueError("target_modules should not contain an empty string: it names no module.")
    others = set(other_module_names)
    common = sorted(targets & others)
    if common:
        raise ValueError(
            f"Cannot compress target_modules: {common} are listed both as targets and as other modules; "
            "target_modules and other_module_names contain common elements, this should not happen, please "
            "open a GitHub issue at https://github.com/huggingface/peft/issues with the code to reproduce this issue"
        )
    taken = {suffix for name in others for suffix in _suffixes(name)}
    chosen = set()
    for target in targets:
        free = next((suffix for suffix in _suffixes(target) if suffix not in taken), None)
        if free is None:
            return targets
        chosen.add(free)
    return chosen


def compress_target_modules(target_modules, module_names, threshold: int):
    """`target_modules` (a list or set of at least `threshold` names) as the minimal suffix set that selects the
    same modules of `module_names`, when that is shorter; otherwise (regex, short list) `target_modules` itself."""
    if not isinstance(target_modules, (list, set, frozenset)) or len(target_modules) < threshold:
        return target_modules
    names = set(target_modules)
    ends = tuple("." + name for name in names)
    others = [key for key in module_names if key not in names and not key.endswith(ends)]
    compressed = minimal_target_suffixes(names, others)
    return compressed if len(compressed) < len(names) else target_modules


# --- which state-dict keys belong to the tuner ----------------------------------------------------------------------
_WRAPPED = ("base_layer", "model")  # the wrapped module of a tuner layer / of a BaseTuner: not adapter state
_FSDP_PREFIX = "_fsdp_wrapped_module."


def _attribute_prefixes(module: nn.Module, module_name: str, adapter_name: Optional[str]) -> set[str]:
    """`<module_name>.<attr>` for each child, own parameter and own buffer of a tuner module, except the wrapped
    module; with `adapter_name`, per-adapter dicts narrow to `<module_name>.<attr>.<adapter_name>` (or nothing)."""
    own = [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)]
    own += [n for n, _ in module.named_buffers(recurse=False)]
    prefixes = set()
    for attr in own:
        if attr in _WRAPPED:
            continue
        prefix = f"{module_name}.{attr}" if module_name else attr
        value = getattr(module, attr)
        keyed = isinstance(value, (nn.ModuleDict, nn.ParameterDict, BufferDict))
        if adapter_name is None or not keyed:
            prefixes.add(prefix)
        elif adapter_name in value:
            prefixes.add(f"{prefix}.{adapter_name}")
    return prefixes


def tuner_state_dict_key_prefixes(model: nn.Module, adapter_name: Optional[str] = None) -> set[str]:
    """State-dict key prefixes of everything the PEFT method owns in `model` (a PeftModel, a BaseTuner or a model
    with injected layers): the attributes of every tuner layer and of the BaseTuner itself, minus the wrapped
    modules. Auxiliary wrappers (`modules_to_save`, trainable tokens) and tuner layers inside them are left out:
    they save themselves. Found from the module tree, so a base module merely named like an adapter is not included."""
    from ..utils.other import AuxiliaryTrainingWrapper
    from .tuner_layer import BaseTunerLayer
    from .tuners_utils import BaseTuner

    prefixes: set[str] = set()
    auxiliary: list[str] = []
    for name, module in model.named_modules():  # parents come before their children
        name = name[len(_FSDP_PREFIX):] if name.startswith(_FSDP_PREFIX) else name
        if isinstance(module, AuxiliaryTrainingWrapper):
            auxiliary.append(name)
        elif isinstance(module, BaseTuner) or (
            isinstance(module, BaseTunerLayer) and not key_under_prefixes(name, auxiliary)
        ):
            prefixes |= _attribute_prefixes(module, name, adapter_name)
    return prefixes


def key_under_prefixes(key: str, prefixes) -> bool:
    """True when `key` equals one of `prefixes` or lies below one (on "." boundaries: "a.b" covers "a.b.c", not
    "a.bc"); walks the key's ancestors, so the cost does not grow with the number of prefixes."""
    prefixes = prefixes if isinstance(prefixes, (set, frozenset, dict)) else set(prefixes)
    while key:
        if key in prefixes:
            return True
        key = key.rpartition(".")[0]
    return False


def filter_state_dict_by_key_prefixes(state_dict: dict, prefixes) -> dict:
    """The entries of `state_dict` whose key lies under one of `prefixes` (see `key_under_prefixes`)."""
    prefixes = set(prefixes)
    return {key: value for key, value in state_dict.items() if key_under_prefixes(key, prefixes)}


# --- explaining what matched ---------------------------------------------------------------------------------------
def _show(value) -> str:
    return repr(sorted(value) if isinstance(value, (set, frozenset)) else value)


def _sample_names(model: nn.Module, limit: int = 12) -> list[str]:
    names = [k for k, m in model.named_modules() if k and not list(m.children())]
    return names[:limit] + (["..."] if len(names) > limit else [])


def no_match_error(config, model: nn.Module, excluded: list[str], unmatched: bool) -> ValueError:
    """The error for a config that adapts nothing in `model`, saying whether exclusions (`exclude_modules`,
    `modules_to_save`) or plain non-matches are the cause; it leads with upstream's sentence for each case."""
    if excluded and not unmatched:
        lead = "All modules were excluded (exclude_modules / modules_to_save)."
    elif not excluded and not config.target_modules:
        lead = "No `target_modules` passed and no `target_parameters` matched."
    elif not excluded:
        lead = f"Target modules {_show(config.target_modules)} not found in the base model."
    else:
        lead = ("No modules were targeted for adaptation. This might be caused by a combination of target_modules "
                f"and exclusions: some matched but were excluded ({excluded[:5]}), the rest did not match.")
    return ValueError(
        f"{lead} target_modules={_show(config.target_modules)} (layers_to_transform={config.layers_to_transform}, "
        f"layers_pattern={config.layers_pattern!r}, exclude_modules={_show(config.exclude_modules)}) matched no "
        f"module of {type(model).__name__}; some module names: {_sample_names(model)}."
    )


def unmatched_target_warning(config, modules: list[str], parameters: list[str], excluded: list[str]):
    """(message, category) for `warnings.warn` when part of a config that adapted something found nothing: unused
    `exclude_modules`, `target_modules` that matched no module, `target_parameters` that matched no parameter."""
    if getattr(config, "exclude_modules", None) and not excluded:
        return (f"You have passed exclude_modules={_show(config.exclude_modules)} but no modules were excluded; "
                "check its names against the model's module names.", UserWarning)
    if config.target_modules and not modules:
        return f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning
    if getattr(config, "target_parameters", None) and not parameters:
        return f"target_parameters={config.target_parameters} were set but no parameter was matched.", RuntimeWarning
    return None


def unused_pattern_warnings(config, targeted: list[str], fields=("rank_pattern", "alpha_pattern")) -> list[str]:
    """One message per pattern field of `config` (`fields`: those the tuner type matches against module names) with
    keys that select none of the `targeted` names (so they were ignored), matched as `pattern_value` matches them."""
    messages = []
    for attr in fields:
        patterns = getattr(config, attr, None) or {}
        unused = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", key) for key in targeted))
        if unused:
            messages.append(f"{attr} keys that did not match any targeted module were ignored: {unused}.")
    return messages
