"""Wrapping the embeddings that `LoraConfig(trainable_token_indices=...)` names, and the layers tied to them.

`trainable_token_indices` is a list of token ids (the model's input embedding: `get_input_embeddings()`, else a
module named `embed_tokens`) or a dict `{module name: token ids}` (a name matches a module path or its dotted
suffix). Every module holding the same weight tensor as a wrapped embedding (an output layer under
`tie_word_embeddings`) gets a wrapper tied to it, unless it is named itself with other ids (then it trains its own
rows, as in upstream PEFT). Refused, with a `ValueError`, before anything changes: a target that is also a LoRA
target or in `modules_to_save` (upstream refuses these too), a tied layer that is a LoRA target, token ids out of
range, and any later LoRA layer or `modules_to_save` copy put around a trainable-tokens wrapper.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from ...utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from ..target_matching import _inside_adapter_machinery
from ..tuners_utils import BaseTunerLayer
from .layer import TrainableTokensLayer
from .wrapper import TrainableTokensWrapper


def inject_trainable_tokens(model: nn.Module, config, adapter_name: str, active_adapters: Sequence[str]) -> None:
    """Add adapter `adapter_name`'s trainable rows to `model` (in place) as `config.trainable_token_indices` says;
    its rows train when it is active and `config.inference_mode` is False."""
    _refuse_wrapped_wrappers(model)
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return
    from .indices import check_trainable_token_indices

    check_trainable_token_indices(spec)  # again: TRL assigns the field after the config was built
    targets = _resolve_targets(model, spec)
    for key in targets:
        _check_target(model, key)
    own = _drop_tied_targets(model, targets, getattr(config, "ensure_weight_tying", False))
    touched = []
    for key, ids in own.items():
        module = model.get_submodule(key)
        if isinstance(module, TrainableTokensWrapper):
            module.update(adapter_name, ids)
        else:
            module = _replace_everywhere(model, module, TrainableTokensWrapper(module, adapter_name, ids))
        touched.append(module)
    for source in [w for w in touched if isinstance(w.base_layer, nn.Embedding)]:
        touched.extend(_tie_followers(model, source, adapter_name))
    for wrapper in touched:
        wrapper.set_adapter(list(active_adapters))
        if config.inference_mode:
            wrapper.trainable_tokens_delta[adapter_name].requires_grad_(False)


def _resolve_targets(model: nn.Module, spec) -> dict[str, list[int]]:
    """Module key -> token ids."""
    if not isinstance(spec, dict):
        return {_input_embedding_key(model): [int(i) for i in spec]}
    modules = [(k, m) for k, m in model.named_modules(remove_duplicate=False) if k and not _inside_adapter_machinery(k)]
    keys = [k for k, _ in modules]
    out: dict[str, list[int]] = {}
    for name, ids in spec.items():
        found, seen = [], set()  # one module under several names (shared embeddings) counts once
        for key, module in modules:
            if (key == name or key.endswith("." + name)) and id(module) not in seen:
                found.append(key)
                seen.add(id(module))
        if not found:
            raise ValueError(f"trainable_token_indices names module {name!r}, but {type(model).__name__} has no "
                             f"module of that name; some module names: {keys[:12]}.")
        for key in found:
            if key in out and out[key] != list(ids):
                raise ValueError(f"trainable_token_indices gives module {key!r} two lists of token ids: "
                                 f"{out[key]} and {list(ids)}.")
            out[key] = [int(i) for i in ids]
    return out


def _input_embedding_key(model: nn.Module) -> str:
    """Where the input embedding is (a plain list of token ids means that module)."""
    embedding = None
    if hasattr(model, "get_input_embeddings"):
        try:
            embedding = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embedding = None
    for key, module in model.named_modules():
        if embedding is not None and module is embedding:
            return key
    names = [k for k, _ in model.named_modules() if k.split(".")[-1] == "embed_tokens"]
    if names:
        return names[0]
    raise ValueError(
        f"trainable_token_indices is a list of token ids, which means the input embedding, but "
        f"{type(model).__name__} has no get_input_embeddings() and no module named 'embed_tokens'; pass a dict "
        "{module name: token ids} instead."
    )


def _check_target(model: nn.Module, key: str) -> None:
    module = model.get_submodule(key)
    if isinstance(module, TrainableTokensWrapper):
        return
    if isinstance(module, ModulesToSaveWrapper):
        raise ValueError(f"Module {key!r} is in modules_to_save (trained whole) and in trainable_token_indices "
                         "(a few rows trained); name it in only one of them.")
    if isinstance(module, BaseTunerLayer):
        raise ValueError(f"Module {key!r} is a LoRA target (target_modules) and in trainable_token_indices; the two "
                         "cannot be combined on one module (upstream PEFT refuses it too). Drop it from "
                         "target_modules, or train its new rows with trainable_token_indices only.")
    if not isinstance(module, (nn.Embedding, nn.Linear)):
        raise ValueError(f"trainable_token_indices targets {key!r} of type {type(module).__name__}; expected an "
                         "nn.Embedding (or an nn.Linear output layer).")


def _drop_tied_targets(model: nn.Module, targets: dict[str, list[int]], ensure_tying: bool = False):
    """The targets that get rows of their own: a named layer sharing a named embedding's weight with the same ids
    is left out (it will be tied to that embedding's wrapper); with other ids it trains its own rows, or, with
    `ensure_weight_tying`, is refused. `ensure_weight_tying` on a model whose weights are not tied warns."""
    if ensure_tying:
        _check_tying_possible(model, targets)
    embeddings = {}
    for key, ids in targets.items():
        base = _unwrapped(model.get_submodule(key))
        if isinstance(base, nn.Embedding):
            embeddings[id(base.weight)] = (key, ids)
    own = {}
    for key, ids in targets.items():
        module = model.get_submodule(key)
        source = embeddings.get(id(_unwrapped(module).weight))
        tied_to_source = source is not None and source[0] != key
        if isinstance(module, TrainableTokensWrapper) and module.tied_to is not None:
            if not (tied_to_source and source[1] == ids):
                raise ValueError(f"Module {key!r} shares its weight with an embedding whose trainable tokens it "
                                 f"follows; give it the same token ids as that embedding, or leave it out.")
            continue
        if not (tied_to_source and source[1] == ids):
            own[key] = ids
    return own


def _check_tying_possible(model: nn.Module, targets: dict[str, list[int]]) -> None:
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.")
        return
    by_weight: dict[int, list[str]] = {}
    for key in targets:
        by_weight.setdefault(id(_unwrapped(model.get_submodule(key)).weight), []).append(key)
    for keys in by_weight.values():
        if len({tuple(targets[k]) for k in keys}) > 1:
            detail = ", ".join(f"{k}: {targets[k]}" for k in keys)
            raise ValueError(f"Cannot ensure weight tying when different token indices are specified for tied layers "
                             f"({detail}); give them the same indices or set ensure_weight_tying=False.")


def _tie_followers(model: nn.Module, source: TrainableTokensWrapper, adapter_name: str) -> list:
    """Wrap every plain layer that holds `source`'s weight tensor in a wrapper tied to `source`."""
    weight = source.base_layer.weight
    followers: dict[int, tuple[nn.Module, list[str]]] = {}
    for key, module in model.named_modules(remove_duplicate=False):
        if module is source.base_layer or module._parameters.get("weight") is not weight:
            continue
        parent = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
        if isinstance(parent, (TrainableTokensLayer, ModulesToSaveWrapper)):
            continue  # already wrapped (tied, or named with its own ids), or the original of a trained copy
        if isinstance(parent, BaseTunerLayer) or _inside_adapter_machinery(key):
            raise ValueError(
                f"Module {key!r} shares its weight with the embedding wrapped for trainable_token_indices (tied "
                "weights) and is a LoRA target, so its trainable rows cannot follow the embedding's. Drop it from "
                "target_modules, or untie the weights."
            )
        followers.setdefault(id(module), (module, []))[1].append(key)
    return [_replace_everywhere(model, module, TrainableTokensWrapper(module, adapter_name, tied_to=source))
            for module, _ in followers.values()]


def _replace_everywhere(model: nn.Module, module: nn.Module, wrapper: TrainableTokensWrapper):
    """Put `wrapper` wherever `module` is referenced (one module may sit under several names, e.g. T5's `shared`
    and `encoder.embed_tokens`)."""
    for key, current in list(model.named_modules(remove_duplicate=False)):
        if current is module and key:
            parent_key, _, name = key.rpartition(".")
            parent = model.get_submodule(parent_key) if parent_key else model
            if not isinstance(parent, TrainableTokensLayer):
                setattr(parent, name, wrapper)
    return wrapper


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokensWrapper) else module


def _refuse_wrapped_wrappers(model: nn.Module) -> None:
    """A LoRA layer or a `modules_to_save` copy around a trainable-tokens wrapper (a later adapter targeting a
    wrapped embedding) would merge inconsistently; refuse it."""
    machinery = {k: m for k, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}
    for key, module in machinery.items():
        if not isinstance(module, TrainableTokensWrapper):
            continue
        outer = [k for k, m in machinery.items() if key.startswith(k + ".")]
        if outer:
            raise ValueError(
                f"Module {outer[0]!r} ({type(machinery[outer[0]]).__name__}) wraps a layer that trains "
                f"trainable_token_indices rows ({key!r}); an embedding with trainable tokens cannot also be a LoRA "
                "target or in modules_to_save."
            )
