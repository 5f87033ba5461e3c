"""EVA (Paischer et al. 2024, arXiv 2410.07170): LoRA's A from the top right singular vectors of layer inputs.

For a target layer with inputs X (tokens, n), streamed batch by batch through an incremental PCA (`peft.utils.
incremental_pca`), A = the top-k principal directions of X (k, n) and B = 0, so the model is unchanged at init. Each
layer first keeps `round(rho * r)` components; the total rank budget (the sum of the layers' r) then goes to the
components with the largest explained-variance ratios over all layers together, so a layer's final rank is how
many of its components made the cut (0: the layer is not adapted). With `adjust_scaling_factors`, a layer whose rank
moved from r to r' gets `lora_alpha * r' / r`, which keeps `lora_alpha / r`. A layer's SVD stops once the cosine
similarity of each kept component before / after a batch reaches `tau`.

Usage as upstream: `model = get_peft_model(base, LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...)))`,
then `initialize_lora_eva_weights(model, dataloader)` (or `get_eva_state_dict(...)` first, then
`initialize_lora_eva_weights(model, eva_state_dict=...)`).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn


@dataclass
class EvaConfig:
    """Upstream's `eva_config`: rho (max rank per layer = rho * r, >= 1), tau (stop a layer's incremental SVD when
    the cosine similarity of its components between two batches reaches tau, in [0, 1]), use_label_mask /
    label_mask_value (drop token positions whose label equals the value), whiten (scale components by 1 / singular
    value), adjust_scaling_factors (keep `lora_alpha / r` of each layer after the rank redistribution)."""

    rho: float = field(default=2.0, metadata={"help": "Max rank of a layer is rho * r (>= 1.0)."})
    tau: float = field(default=0.99, metadata={"help": "Cosine-similarity threshold for stopping a layer's SVD."})
    use_label_mask: bool = field(default=True, metadata={"help": "Ignore positions whose label is label_mask_value."})
    label_mask_value: int = field(default=-100, metadata={"help": "Label of the ignored positions."})
    whiten: bool = field(default=False, metadata={"help": "Divide the components by their singular values."})
    adjust_scaling_factors: bool = field(default=True, metadata={"help": "Rescale alpha after redistribution."})

    def __post_init__(self):
        if self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")


# --- pure math ----------------------------------------------------------------------------------------------------
def redistribute_ranks(explained: dict, budget: int, max_components: dict) -> dict:
    """EVA's rank rule: pool every layer's explained-variance ratios (the first `max_components[name]` of
    `explained[name]`), keep the `budget` largest, and give each layer as many components as it has among them."""
    pool = [(float(v), name) for name, ratios in explained.items() for v in ratios[: max_components[name]]]
    pool.sort(key=lambda item: -item[0])
    ranks = {name: 0 for name in explained}
    for _, name in pool[:budget]:
        ranks[name] += 1
    return ranks


def components_converged(previous: torch.Tensor, current: torch.Tensor, tau: float) -> torch.Tensor:
    """(k,) bool: cosine similarity of each component row before / after a batch reaches `tau`."""
    return torch.nn.functional.cosine_similarity(current, previous, dim=-1) >= tau


# --- input preparation (upstream's defaults) ----------------------------------------------------------------------
def forward_fn_dict(model, inputs):
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config):
    """Indices (k, 2) of the (batch, position) pairs to use: attention mask, minus label-masked positions."""
    if not isinstance(model_input, dict):
        raise TypeError("prepare_model_inputs_fn_language_modeling expects the batch as a dict, got "
                        f"{type(model_input).__name__}.")
    keep = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    options = peft_config.eva_config
    if options.use_label_mask and "labels" in model_input:
        keep = keep & (model_input["labels"] != options.label_mask_value)
    return keep.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The rows of the layer input (batch, seq, n) at the indices of `prepare_model_inputs_fn_language_modeling`."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"Layer {layer_name!r} got input of type {type(layer_input).__name__}; pass a "
                        "prepare_layer_inputs_fn that returns a 2-D tensor.")
    return layer_input[model_input.T.unbind()]


def _default_layer_inputs(layer_input, model_input, layer_name) -> torch.Tensor:
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.shape[-1])


# --- model pass ---------------------------------------------------------------------------------------------------
def _targets(model, peft_config, is_peft: bool):
    from ..target_matching import is_target
    from .layer import LoraLayer

    for name, module in model.named_modules():
        if is_peft:
            if isinstance(module, LoraLayer) and type(module).__name__ in ("Linear",):
                yield name, module
        elif (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and \
                (peft_config.target_modules is None or is_target(peft_config, name)):
            yield name, module


class _LayerSVD:
    """Forward hook: folds a layer's (prepared) inputs into an IncrementalPCA; tracks per-component convergence."""

    def __init__(self, name: str, n_components: int, tau: float, prepare):
        from ...utils.incremental_pca import IncrementalPCA

        self.name, self.n_components, self.tau, self.prepare = name, n_components, tau, prepare
        self.pca = IncrementalPCA(n_components=n_components, copy=True)
        self.converged = torch.zeros(n_components, dtype=torch.bool)
        self.model_input = None

    @torch.no_grad()
    def __call__(self, module, inputs, output):
        rows = self.prepare(inputs, self.model_input, self.name)
        if rows.shape[0] < self.n_components:
            return  # too few rows in this batch for the requested components
        previous = self.pca.components_.clone() if hasattr(self.pca, "components_") else None
        self.pca.partial_fit(rows.detach().to(torch.float32))
        if previous is not None:
            self.converged = components_converged(previous, self.pca.components_, self.tau).cpu()


def _run_until_converged(model, dataloader, hooks, handles, max_components, budget, prepare_inputs, forward_fn):
    """Cycle `dataloader`, unhooking each layer once its kept components converged; returns the final ranks."""
    ranks = dict(max_components)
    for step, batch in enumerate(itertools.cycle(dataloader)):
        starved = [n for n, h in hooks.items() if not hasattr(h.pca, "components_")]
        if step == len(dataloader) and starved:  # a full pass, and some layer never got enough rows in one batch
            raise ValueError(f"EVA: layers {starved} never saw a batch with at least as many rows as their "
                             "components (round(rho * r)); use larger batches or a smaller r / rho.")
        for name, hook in hooks.items():
            done = bool(hook.converged[: ranks[name]].all())
            if done and handles[name] is not None:
                handles[name].remove()
                handles[name] = None
            elif not done and handles[name] is None:
                handles[name] = model.get_submodule(name).register_forward_hook(hook)
        if all(h is None for h in handles.values()):
            return ranks
        hook_input = prepare_inputs(batch)
        for hook in hooks.values():
            hook.model_input = hook_input
        forward_fn(model, batch)
        if all(hasattr(h.pca, "components_") for h in hooks.values()):
            explained = {n: h.pca.explained_variance_ratio_ for n, h in hooks.items()}
            ranks = redistribute_ranks(explained, budget, max_components)
    return ranks


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config=None,
                       forward_fn: Optional[Callable] = forward_fn_dict,
                       prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling, adapter_name: str = "default",
                       gather_distributed_inputs: bool = True, show_progress_bar: bool = True) -> dict:
    """{module name: A (rank, n)} from the incremental SVD of each target layer's inputs over `dataloader` (cycled
    until every layer's kept components converge), ranks redistributed by explained variance (see module doc)."""
    is_peft = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft:
            raise ValueError("get_eva_state_dict needs peft_config when model is not a PeftModel.")
        peft_config = model.peft_config[adapter_name]
    options = peft_config.eva_config or EvaConfig()
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    from ..target_matching import pattern_value

    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    hooks, handles, max_components, budget = {}, {}, {}, 0
    for name, module in _targets(model, peft_config, is_peft):
        rank = pattern_value(name, peft_config.rank_pattern or {}, peft_config.r)
        fn = layer_fns.pop(name, None) if layer_fns is not None else prepare_layer_inputs_fn
        hooks[name] = _LayerSVD(name, round(rank * options.rho), options.tau, fn or _default_layer_inputs)
        handles[name] = module.register_forward_hook(hooks[name])
        max_components[name] = hooks[name].n_components
        budget += rank
    if layer_fns:
        raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found in the "
                         f"model's target modules: {sorted(layer_fns)}")
    training = model.training
    model.eval()
    context = model.disable_adapter() if is_peft else contextlib.nullcontext()
    try:
        with context:
            ranks = _run_until_converged(model, dataloader, hooks, handles, max_components, budget,
                                         lambda batch: prepare_model_inputs_fn(batch, peft_config)
                                         if prepare_model_inputs_fn else batch, forward_fn)
    finally:
        for handle in handles.values():
            if handle is not None:
                handle.remove()
        model.train(training)
    out = {}
    for name, rank in ranks.items():
        pca = hooks[name].pca
        components = pca.components_[:rank].clone()
        if options.whiten:
            components = components / pca.singular_values_[:rank].sqrt()[:, None]
        out[name] = components
    return out


def _strip(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


@torch.no_grad()
def load_eva_state_dict(model: nn.Module, eva_state_dict: dict, adapter_name: str = "default") -> None:
    """Set each LoRA layer's A from `eva_state_dict` (keys: module names with or without `base_model.model.`),
    resizing the adapter where EVA changed the rank and unwrapping layers that got rank 0; the config's
    rank_pattern / alpha_pattern / target_modules are rewritten to match, so the adapter saves and reloads."""
    from ...utils.other import get_submodules
    from ..target_matching import pattern_value
    from .layer import LoraLayer

    config = model.peft_config[adapter_name]
    options = config.eva_config or EvaConfig()
    state = {_strip(k): v for k, v in eva_state_dict.items()}
    targets, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        key = _strip(name)
        r = pattern_value(key, config.rank_pattern or {}, config.r)
        alpha = pattern_value(key, config.alpha_pattern or {}, config.lora_alpha)
        weight = state.pop(key, None)
        if weight is None:
            missing.append(key)
            new_r = r
        else:
            new_r = weight.shape[0]
            if new_r == 0:
                parent, _, child = get_submodules(model, name)
                setattr(parent, child, module.get_base_layer())
                continue
            if new_r != r and options.adjust_scaling_factors:
                alpha = alpha * new_r / r
            if new_r != r or module.lora_A[adapter_name].weight.is_meta:
                module.update_layer(adapter_name, new_r, alpha, lora_dropout=config.lora_dropout,
                                    init_lora_weights="eva", use_rslora=config.use_rslora)
            A = module.lora_A[adapter_name].weight
            A.copy_(weight.to(A.device, A.dtype))
        targets.append(key)
        if new_r != config.r:
            rank_pattern[key] = new_r
        if alpha != config.lora_alpha:
            alpha_pattern[key] = alpha
    if missing:
        warnings.warn(f"EVA: these LoRA layers are not in the eva state_dict and keep init_lora_weights=True's "
                      f"weights: {missing}")
    config.target_modules = targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern


def initialize_lora_eva_weights(model: nn.Module, dataloader: Optional[Iterable] = None,
                                eva_state_dict: Optional[dict] = None,
                                forward_fn: Optional[Callable] = forward_fn_dict,
                                prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True):
    """EVA init of a PeftModel built with `init_lora_weights="eva"`: from `eva_state_dict`, or computed from
    `dataloader` with `get_eva_state_dict`. Returns the model."""
    if not hasattr(model, "peft_config"):
        raise ValueError("initialize_lora_eva_weights expects a PeftModel (get_peft_model(...)); got "
                         f"{type(model).__name__}.")
    if len(getattr(model, "active_adapters", [adapter_name])) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
                                            adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    load_eva_state_dict(model, dict(eva_state_dict), adapter_name)
    return model
