"""Mixed adapter batches: `model(**inputs, adapter_names=[...])` and `model.generate(..., adapter_names=[...])`,
where sample `i` goes through adapter `adapter_names[i]` alone (`"__base__"`: through no adapter), as upstream PEFT.

`per_sample_adapters(peft_model, kwargs)` pops `adapter_names` and returns the context the call runs in:
`mixed_adapter_context` checks the request once for the whole model (inference mode, known names, nothing
merged, no DoRA adapter named), then, for the duration of the call only,

- gives every LoRA layer the names through a forward pre-hook: its forward receives them as the `adapter_names`
  keyword and calls `mixed_forward`;
- shadows the forward of each `modules_to_save` / trainable-tokens wrapper (an instance attribute in front of the
  class's method, removed on exit) with one that runs each group of samples through its adapter's copy or rows.

A LoRA layer computes `y = base(x)`, then for each adapter `a` in the batch replaces the rows `R_a` of its samples
by `y[R_a] + s_a B_a(A_a(dropout_a(x[R_a])))`: each sample gets what a forward with only its adapter active gives.
Disabled adapters win (the names are ignored, as upstream). In generate, where each sample becomes
`k = max(num_beams, num_return_sequences)` rows, each name is repeated `k` times; an encoder (encoder-decoder
models) keeps one name per sample, as it runs before the expansion.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Optional, Sequence

import torch
from torch import nn

BASE_NAME = "__base__"
# The whole-module copies of `modules_to_save` mix per sample only for modules that are batch-first by construction.
_BATCH_FIRST_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MixedBatchError(ValueError, TypeError):
    """A layer that cannot mix adapters per sample: a `ValueError` like every refusal here, and a `TypeError` like
    upstream's for `lora.MultiheadAttention` and `modules_to_save` copies of other module types."""


# --- pure helpers ---------------------------------------------------------------------------------------------------
def sample_groups(adapter_names: Sequence[str]) -> list[tuple[str, list[int]]]:
    """`(name, indices of the samples that use it)` per distinct name, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(i)
    return list(groups.items())


def repeat_per_beam(adapter_names: Sequence[str], num_beams: Optional[int]) -> list[str]:
    """Each name `k = num_beams` times in a row: generate expands sample `i` to rows `i*k .. i*k + k-1`."""
    k = num_beams if isinstance(num_beams, int) and num_beams > 1 else 1
    return [name for name in adapter_names for _ in range(k)]


def check_names(adapter_names: Any) -> list[str]:
    """The names as a list; anything but a list/tuple of strings is refused (a bare string would be read per letter)."""
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError(
            f"Invalid adapter_names={adapter_names!r}: expected a list with one adapter name (a str, or "
            f"{BASE_NAME!r} for the base model) per sample of the batch."
        )
    return list(adapter_names)


def check_batch_length(adapter_names: Sequence[str], x: torch.Tensor, module: nn.Module) -> None:
    if len(adapter_names) != len(x):
        raise ValueError(
            f"Length of `adapter_names` should be the same as the number of inputs, but got {len(adapter_names)} "
            f"and {len(x)} respectively (input of shape {tuple(x.shape)} reaching {type(module).__name__}); "
            "pass one name per sample, the batch dimension first."
        )


def _rows(index: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(index, dtype=torch.long, device=device)


# --- LoRA layers ----------------------------------------------------------------------------------------------------
def lora_branch(layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """`s B(A(dropout(x)))` of adapter `name`, computed as the layer's ordinary forward computes it."""
    if name in layer.lora_embedding_A:
        return layer._embedding_branch(name, x)
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    return lora_B(lora_A(layer.lora_dropout[name](x.to(lora_A.weight.dtype)))) * layer.scaling[name]


def mixed_forward(layer: nn.Module, x: torch.Tensor, adapter_names: Sequence[str], *args, **kwargs) -> torch.Tensor:
    """Forward of a LoRA Linear / Conv / Embedding with sample `i` through adapter `adapter_names[i]` only."""
    if layer.disable_adapters:
        return layer._base_forward(x, *args, **kwargs)
    check_batch_length(adapter_names, x, layer)
    if layer.merged:
        raise ValueError(_merged_message(layer.merged_adapters))
    result = layer.base_layer(x, *args, **kwargs)
    held = set(layer.lora_A) | set(layer.lora_embedding_A)
    for name, index in sample_groups(adapter_names):
        if name == BASE_NAME or name not in held:  # an adapter that does not target this layer leaves it as base
            continue
        if layer.use_dora.get(name):
            raise ValueError(_dora_message([name]))
        rows = _rows(index, result.device)
        updated = result[rows] + lora_branch(layer, name, x[rows.to(x.device)])
        result = result.index_put((rows,), updated.to(result.dtype))
    return result


def _merged_message(merged: Sequence[str]) -> str:
    return (f"Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first "
            f"(merged: {sorted(set(merged))}).")


def _dora_message(names: Sequence[str]) -> str:
    return (f"Cannot pass `adapter_names` when DoRA is enabled for a named adapter: {sorted(set(names))} use DoRA, "
            "whose per-sample forward is not implemented; name only plain LoRA adapters or '__base__'.")


def _names_hook(adapter_names: list[str]):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if not getattr(module, "supports_mixed_batch", False):
            raise MixedBatchError(
                f"lora.{type(module).__name__} does not support mixed adapter batches (adapter_names="
                f"{sorted(set(adapter_names))}); supported: LoRA on Linear, Embedding and Conv1d/2d/3d layers."
            )
        return args, {**kwargs, "adapter_names": adapter_names}

    return hook


# --- modules_to_save and trainable-token wrappers -------------------------------------------------------------------
def _run_modules_to_save(wrapper: nn.Module, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not isinstance(wrapper.original_module, _BATCH_FIRST_MODULES):
        names = ", ".join(cls.__name__ for cls in _BATCH_FIRST_MODULES)
        raise MixedBatchError(
            f"Mixed batching is only supported for the following modules: {names}. The modules_to_save module "
            f"{type(wrapper.original_module).__name__} is not one of them (its batch dimension is not known)."
        )
    copies = wrapper.modules_to_save
    module = copies[name] if name in copies else wrapper.original_module
    return module(x, *args, **kwargs)


def _run_trainable_tokens(wrapper: nn.Module, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from ..trainable_tokens.functional import forward_with_rows

    rows = [] if name == BASE_NAME else wrapper._rows_owner().token_adapter.rows([name])
    return forward_with_rows(wrapper.base_layer, rows, x, *args, **kwargs)


def _wrapper_forward(wrapper: nn.Module, adapter_names: list[str], run_group):
    """A forward for `wrapper` that runs each group of samples through `run_group(wrapper, name, x[rows])`."""
    ordinary = type(wrapper).forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if wrapper.disable_adapters:
            return ordinary(wrapper, x, *args, **kwargs)
        check_batch_length(adapter_names, x, wrapper)
        result = None
        for name, index in sample_groups(adapter_names):
            rows = _rows(index, x.device)
            out = run_group(wrapper, name, x[rows], *args, **kwargs)
            if result is None:
                result = out.new_zeros((len(x), *out.shape[1:]))
            result = result.index_copy(0, rows.to(out.device), out)
        return result

    return forward


# --- the context ----------------------------------------------------------------------------------------------------
def _encoder(model: nn.Module) -> Optional[nn.Module]:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return None


def _check_request(tuner: nn.Module, names: list[str]) -> None:
    """Refusals that hold for the whole model, before anything runs (nothing is changed by a refusal)."""
    from .layer import LoraLayer

    if tuner.training:
        raise ValueError(f"Cannot pass `adapter_names` when the model is in training mode (adapter_names={names!r}); "
                         "call model.eval() first: per-sample adapters are for inference.")
    requested = {n for n in names if n != BASE_NAME}
    unknown = requested - set(tuner.peft_config)
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}. Known adapters: "
                         f"{sorted(tuner.peft_config)}, or {BASE_NAME!r} for the base model.")
    layers = [m for _, m in tuner.tuner_layers()]
    merged = [n for m in layers if getattr(m, "merged", False) for n in m.merged_adapters]
    if merged:
        raise ValueError(_merged_message(merged))
    dora = [n for m in layers if isinstance(m, LoraLayer) for n in requested if m.use_dora.get(n)]
    if dora:
        raise ValueError(_dora_message(dora))


@contextmanager
def mixed_adapter_context(tuner: nn.Module, adapter_names: Any, num_beams: Optional[int] = None):
    """Within the block, each forward of `tuner.model` sends sample `i` through adapter `adapter_names[i]`."""
    from ...utils.other import ModulesToSaveWrapper
    from ..trainable_tokens.wrapper import TrainableTokensWrapper
    from .layer import LoraLayer

    names = check_names(adapter_names)
    _check_request(tuner, names)
    expanded = repeat_per_beam(names, num_beams)
    encoder = _encoder(tuner.model) if len(expanded) != len(names) else None
    in_encoder = {id(m) for m in encoder.modules()} if encoder is not None else set()
    handles, shadowed = [], []
    try:
        for module in tuner.model.modules():
            own = names if id(module) in in_encoder else expanded
            if isinstance(module, LoraLayer):
                handles.append(module.register_forward_pre_hook(_names_hook(own), with_kwargs=True))
            elif isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
                run = _run_modules_to_save if isinstance(module, ModulesToSaveWrapper) else _run_trainable_tokens
                module.__dict__["forward"] = _wrapper_forward(module, own, run)
                shadowed.append(module)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in shadowed:
            module.__dict__.pop("forward", None)


def generation_expansion(kwargs: dict, model_config: Any = None) -> int:
    """Rows per sample in generate: `max(num_beams, num_return_sequences)` (transformers expands each sample to
    that many), each read as generate reads it: the keyword, else the `generation_config` passed, else the model's."""

    config = kwargs.get("generation_config") or model_config

    def setting(key: str) -> int:
        value = kwargs[key] if kwargs.get(key) is not None else getattr(config, key, None)
        return value if isinstance(value, int) else 1

    return max(setting("num_beams"), setting("num_return_sequences"), 1)


def per_sample_adapters(peft_model: nn.Module, kwargs: dict, generate: bool = False):
    """Pops `adapter_names` from a `PeftModel.forward` / `generate` call's `kwargs`; the context to run it in."""
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None or not peft_model.has_active_enabled_adapter:  # disabled adapters win, as upstream
        return nullcontext()
    tuner = peft_model.base_model
    if not hasattr(tuner, "_enable_peft_forward_hooks"):
        raise ValueError(f"adapter_names={adapter_names!r}: per-sample adapters need a LoRA model, got "
                         f"{type(tuner).__name__}.")
    expand = generation_expansion(kwargs, getattr(tuner.model, "generation_config", None)) if generate else 1
    return tuner._enable_peft_forward_hooks(adapter_names=adapter_names, num_beams=expand)
