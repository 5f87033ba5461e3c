"""Tied weights (an output layer or a second embedding holding the input embedding's weight, `tie_word_embeddings`)
and what an adapter does with them: upstream PEFT's `ensure_weight_tying`.

`tied_module_names(model)` lists the modules whose weight is declared tied to the input embedding (the model's
`_tied_weights_keys`, a list or transformers v5's `{target: source}` map, honouring `config.tie_word_embeddings`).

With `LoraConfig(ensure_weight_tying=True)` the adapter keeps the tie:
- `modules_to_save` naming an embedding-like layer (`embed_tokens`, `lm_head`): the input embedding gets the trained
  copy and every tied module a copy *sharing* that copy's weight (a `Linear` for an output layer);
- `target_modules` naming one: the input embedding gets the LoRA layer, and each tied module a LoRA layer whose
  factors are the embedding's (output layer: `A_out = B_emb^T`, `B_out = A_emb^T`, so `B_out A_out = (B_emb A_emb)^T`,
  the same update of the shared matrix).
The config is rewritten as upstream does (the embedding added, the tied names removed), so the saved
`adapter_config.json` and keys are upstream's.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
_NOT_SET = "`ensure_weight_tying` is not set to True"


def tied_module_names(model: nn.Module) -> list[str]:
    """Sorted names of the modules whose weight is declared tied to the input embedding's (empty when the model's
    config says `tie_word_embeddings=False` or the model declares no `_tied_weights_keys`)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    declared = getattr(model, "_tied_weights_keys", None)
    if declared is None:
        return []
    if not isinstance(declared, dict):
        return sorted({key.rpartition(".")[0] for key in declared})
    if not hasattr(model, "get_input_embeddings"):  # the source of a {target: source} map cannot be found
        return []
    embedding = model.get_input_embeddings()
    embedding_params = {id(p) for p in embedding.parameters()}
    holders = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in embedding_params}
    pairs = {}
    for prefix, module in model.named_modules():
        for target, source in (getattr(module, "_tied_weights_keys", None) or {}).items():
            pairs[f"{prefix}.{target}" if prefix else target] = f"{prefix}.{source}" if prefix else source
    return sorted({target.rpartition(".")[0] for target, source in pairs.items() if source in holders})


def _embedding_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


def _names_embedding(names) -> bool:
    if isinstance(names, str):
        return any(re.fullmatch(names, n) for n in EMBEDDING_LAYER_NAMES)
    return any(n.split(".")[-1] in EMBEDDING_LAYER_NAMES for n in names or [])


def _matches(name: str, key: str) -> bool:
    return re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", key) is not None


def plan_weight_tying(model: nn.Module, config) -> None:
    """Rewrite `config` (in place) for `ensure_weight_tying`, and warn as upstream does when it cannot apply or is
    not asked for while a tied layer is adapted. Sets `config.modules_to_tie` / `config.target_modules_to_tie`
    (runtime attributes, not saved)."""
    to_save = _names_embedding(getattr(config, "modules_to_save", None))
    in_target = _names_embedding(config.target_modules)
    tied = tied_module_names(model)
    if not getattr(config, "ensure_weight_tying", False):
        if (to_save or in_target) and tied:
            warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                          f"{_NOT_SET}. Merging the adapter or converting the model may then break the tie "
                          "(https://github.com/huggingface/peft/issues/2777).")
        return
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model.")
        return
    if not (to_save or in_target):
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`.")
        return
    embedding = _embedding_name(model)
    if to_save:
        config.modules_to_tie = set(tied)
        names = list(config.modules_to_save)
        names = names if embedding in names else names + [embedding]
        config.modules_to_save = _drop_tied(names, tied)
        return
    config.target_modules_to_tie = set(tied)
    if isinstance(config.target_modules, str):  # the embedding joins; the tied modules are tied, not matched
        skip = "|".join(re.escape(k) for k in tied)
        config.target_modules = rf"(?!(?:{skip})$)(?:{config.target_modules}|{re.escape(embedding)})"
        return
    config.target_modules = set(_drop_tied(list(config.target_modules) + [embedding], tied))


def _drop_tied(names: list[str], tied: list[str]) -> list[str]:
    """`names` less, for each tied key, the first name that matches it."""
    names = list(dict.fromkeys(names))
    for key in tied:
        hit = next((n for n in names if _matches(n, key)), None)
        if hit is not None:
            names.remove(hit)
    return names


def tie_modules_to_save(model: nn.Module, config, adapter_name: str) -> None:
    """Give every module of `config.modules_to_tie` a `modules_to_save` copy sharing the input embedding copy's
    weight (an output layer: a bias-free `Linear` on that weight; an embedding: the embedding copy itself)."""
    from ...utils.other import ModulesToSaveWrapper, get_submodules

    names = getattr(config, "modules_to_tie", None)
    if not names:
        return
    source = model.get_input_embeddings()
    if not isinstance(source, ModulesToSaveWrapper) or adapter_name not in source.modules_to_save:
        return
    copy_ = source.modules_to_save[adapter_name]
    for key in sorted(names):
        parent, target, attr = get_submodules(model, key)
        if not isinstance(target, ModulesToSaveWrapper):
            target = ModulesToSaveWrapper(target, adapter_name)
            setattr(parent, attr, target)
        base = target.original_module
        if isinstance(base, nn.Embedding):
            follower = copy_
        else:
            follower = nn.Linear(copy_.weight.shape[1], copy_.weight.shape[0], bias=False,
                                 device="meta", dtype=copy_.weight.dtype)
            follower.weight = copy_.weight
        target.modules_to_save[adapter_name] = follower
        target.original_module.requires_grad_(False)


def tie_lora_targets(model: nn.Module, config, adapter_name: str, create) -> list[str]:
    """Create the LoRA layers of `config.target_modules_to_tie` (with `create(key)`) and make their factors the
    input embedding LoRA layer's; returns the keys adapted."""
    from .layer import LoraLayer

    names = getattr(config, "target_modules_to_tie", None)
    if not names:
        return []
    source = model.get_input_embeddings()
    if not isinstance(source, LoraLayer) or adapter_name not in getattr(source, "lora_embedding_A", {}):
        return []
    emb_A, emb_B = source.lora_embedding_A[adapter_name], source.lora_embedding_B[adapter_name]  # (r, V), (d, r)
    done = []
    for key in sorted(names):
        create(key)
        layer = model.get_submodule(key)
        if hasattr(layer, "lora_embedding_A") and adapter_name in layer.lora_embedding_A:
            layer.lora_embedding_A[adapter_name] = emb_A
            layer.lora_embedding_B[adapter_name] = emb_B
        elif adapter_name in getattr(layer, "lora_A", {}):
            layer.lora_A[adapter_name].weight = nn.Parameter(emb_B.t(), requires_grad=emb_B.requires_grad)  # (r, d)
            layer.lora_B[adapter_name].weight = nn.Parameter(emb_A.t(), requires_grad=emb_A.requires_grad)  # (V, r)
        if layer.get_base_layer().weight is source.get_base_layer().weight:
            layer._write_base_weight = _source_writes_shared_weight
        done.append(key)
    return done


def _source_writes_shared_weight(weight) -> None:
    """A tied layer's merge / unmerge leaves the shared weight alone: the embedding layer adds (or removes) the one
    update both layers make, so merging them all gives `W + s B A` once, not twice."""
