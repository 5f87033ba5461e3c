"""Hot-swapping a loaded LoRA adapter for another one in place: the same layers and parameter objects keep living
(so a `torch.compile`d model is not recompiled), only their values (and the scales) change.

- `hotswap_adapter(model, path, adapter_name)`: read the new adapter, check that its config is compatible with the
  active one, then `hotswap_adapter_from_state_dict`.
- `hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)`: state-dict keys in the model's own form
  (adapter name inserted). Every key is checked before anything is written; a key the model does not hold is a
  RuntimeError (adding layers would change the compiled graph). Adapter tensors the new adapter does not have are
  zeroed. A new factor of smaller rank is written into the leading rows (A) / columns (B) of the old one, the rest
  zeroed, so `B A` is unchanged by the padding; a larger one replaces the tensor (not possible without
  recompilation).
- `prepare_model_for_compiled_hotswap(model, target_rank=...)`: before compiling, turn the scales into tensors
  (updated with `fill_` on a swap) and zero-pad every LoRA Linear / Conv2d factor to `target_rank`.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Union

import torch
from torch import nn

from ...utils.peft_types import PeftType
from ..target_matching import pattern_value
from .layer import LoraLayer

CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}
_FACTORS = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}  # container -> rank dim


# --- pure helpers -------------------------------------------------------------------------------------------------
def padded(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """`tensor` zero-padded along `dim` to size `rank` (a new tensor, same dtype and device)."""
    if tensor.shape[dim] > rank:
        raise ValueError(f"Trying to pad the adapter to the target rank {rank}, but the original rank is larger "
                         f"({tensor.shape[dim]}). This is not possible.")
    shape = list(tensor.shape)
    shape[dim] = rank
    out = tensor.new_zeros(shape)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


def padded_grouped(tensor: torch.Tensor, rank: int, dim: int, groups: int = 1) -> torch.Tensor:
    """`tensor` zero-padded along `dim` to `rank` block by block: its `groups` equal blocks along `dim` each lead a
    block of `rank / groups` (a grouped conv's lora_A, whose output channels lora_B reads group by group)."""
    if groups == 1:
        return padded(tensor, rank, dim)
    if rank % groups or tensor.shape[dim] % groups:
        raise ValueError(f"Cannot pad a rank of {tensor.shape[dim]} to {rank} in {groups} groups: expected both "
                         f"divisible by groups={groups}.")
    blocks = tensor.split(tensor.shape[dim] // groups, dim)
    return torch.cat([padded(block, rank // groups, dim) for block in blocks], dim)


def scale_of(config, key: str) -> float:
    """The adapter scale `config` gives the layer at `key` (rank / alpha patterns, rsLoRA)."""
    rank = pattern_value(key, config.rank_pattern or {}, config.r)
    alpha = pattern_value(key, config.alpha_pattern or {}, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _fits(old: torch.Size, new: torch.Size, dim: int) -> str:
    """"same", "smaller" (new rank fits into old), "larger" (new rank is larger), or "bad" (other dims differ)."""
    if old == new:
        return "same"
    if len(old) != len(new) or any(o != n for i, (o, n) in enumerate(zip(old, new)) if i != dim):
        return "bad"
    return "smaller" if new[dim] < old[dim] else "larger"


# --- the model's adapter tensors ----------------------------------------------------------------------------------
def _root(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile wrapper


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, tuple[LoraLayer, str, nn.Parameter]]:
    """{state-dict key: (layer, container, parameter)} for every factor of `adapter_name` in `model`."""
    found = {}
    for layer_name, layer in _root(model).named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for attr in _FACTORS:
            container = getattr(layer, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            prefix = f"{layer_name}.{attr}.{adapter_name}"
            if isinstance(item, nn.Parameter):
                found[prefix] = (layer, attr, item)
            else:
                found.update({f"{prefix}.{n}": (layer, attr, p) for n, p in item.named_parameters()})
    return found


def _set_scale(layer: LoraLayer, adapter_name: str, value: float) -> None:
    current = layer.scaling[adapter_name]
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        layer.scaling[adapter_name] = value


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config,
    parameter_prefix: str = "lora_",
) -> None:
    """Write `state_dict` (keys as in `model.state_dict()`, adapter name included) into adapter `adapter_name`."""
    if any(adapter_name in getattr(m, "merged_adapters", []) for m in _root(model).modules()
           if isinstance(m, LoraLayer)):
        raise ValueError(f"Cannot hot-swap adapter {adapter_name!r} because it is currently merged into the base "
                         "weights; call unmerge_adapter() first (a swap of merged weights would corrupt the base).")
    current = _adapter_tensors(model, adapter_name)
    unexpected = [k for k in state_dict if k.removeprefix("_orig_mod.") not in current]
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}.")
    plan = {}
    for key, value in state_dict.items():
        layer, attr, param = current[key.removeprefix("_orig_mod.")]
        fit = _fits(param.shape, value.shape, _FACTORS[attr])
        if fit == "bad":
            raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {tuple(param.shape)} vs "
                             f"{tuple(value.shape)}; only the rank may differ (pad the model to the largest rank "
                             "with peft.utils.hotswap.prepare_model_for_compiled_hotswap).")
        plan[key.removeprefix("_orig_mod.")] = (layer, attr, param, value, fit)
    with torch.no_grad():
        for key in set(current) - set(plan):  # the new adapter does not touch this layer: no update there
            current[key][2].zero_()
        for key, (layer, attr, param, value, fit) in plan.items():
            _set_scale(layer, adapter_name, scale_of(config, key))
            value = value.to(device=param.device, dtype=param.dtype)
            if fit == "same":
                param.copy_(value)
            elif fit == "smaller":
                groups = _groups(layer) if attr == "lora_A" else 1
                param.copy_(padded_grouped(value, param.shape[_FACTORS[attr]], _FACTORS[attr], groups))
            else:
                _grow(param, value)


def _grow(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give `param` the larger `value` (a different shape: a compiled model recompiles)."""
    replacement = nn.Parameter(value.clone(), requires_grad=param.requires_grad)
    try:
        torch.utils.swap_tensors(param, replacement)
    except RuntimeError:
        param.data = value.clone()


def check_hotswap_configs_compatible(config0, config1) -> None:
    """Raise ValueError unless the two configs may be swapped (same type, LoRA, same output-affecting options)."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {config0.peft_type.value} and {config1.peft_type.value}")
    if config0.peft_type not in CONFIG_KEYS_TO_CHECK:
        supported = ", ".join(t.value for t in CONFIG_KEYS_TO_CHECK)
        raise ValueError(f"Hotswapping only supports {supported} but {config0.peft_type.value} was passed.")
    first, second = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in CONFIG_KEYS_TO_CHECK[config0.peft_type]:
        a, b = first.get(key, missing), second.get(key, missing)
        if a != b:
            raise ValueError(f"Configs are incompatible: for {key}, {a} != {b}")


def _with_adapter_name(file_key: str, adapter_name: str, prefix: str = "lora_") -> str:
    """Saved key -> in-memory key: `...lora_A.weight` -> `...lora_A.<name>.weight`, `...lora_embedding_A` ->
    `...lora_embedding_A.<name>`."""
    parts = file_key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith(prefix):
            return ".".join(parts[: i + 1] + [adapter_name] + parts[i + 1:])
    return file_key


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str,
                    torch_device: Optional[str] = None, **kwargs) -> None:
    """Replace the weights (and scales) of the loaded adapter `adapter_name` of the PeftModel `model` (compiled or
    not) with those of the adapter saved at `model_name_or_path`; the name stays. Raises ValueError for an
    incompatible config, RuntimeError for an adapter targeting layers the model has no adapter on."""
    from ...utils.other import infer_device
    from ...utils.save_and_load import load_adapter_pair

    device = torch_device if torch_device is not None else infer_device()
    hub = {k: v for k, v in kwargs.items() if k in ("subfolder", "revision", "cache_dir", "token", "force_download",
                                                     "local_files_only")}
    config, weights, _ = load_adapter_pair(model_name_or_path, device=device, **hub)
    check_hotswap_configs_compatible(_root(model).active_peft_config, config)
    if set(model.peft_config) and adapter_name not in model.peft_config:
        raise ValueError(f"Invalid adapter_name={adapter_name!r}: the model has no such adapter "
                         f"(it has {sorted(model.peft_config)}).")
    state_dict = {_with_adapter_name(k, adapter_name): v for k, v in weights.items()}
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


# --- preparing a model for compilation ----------------------------------------------------------------------------
def _scales_to_tensors(model: nn.Module) -> bool:
    found = False
    for layer in _root(model).modules():
        if not isinstance(layer, LoraLayer):
            continue
        found = True
        device = layer.get_base_layer().weight.device
        for name, value in list(layer.scaling.items()):
            if not isinstance(value, torch.Tensor):
                layer.scaling[name] = torch.tensor(float(value), device=device)
    return found


def _groups(layer: nn.Module) -> int:
    """The groups of a LoRA conv layer's lora_B (1 for other layers)."""
    if not isinstance(layer, LoraLayer) or not isinstance(layer.get_base_layer(), nn.Conv2d):
        return 1
    return layer.get_base_layer().groups


def _padded_module(module: nn.Module, rank: int, dim: int, groups: int = 1) -> nn.Module:
    """A copy of factor `module` (Linear or Conv2d) with its rank zero-padded to `rank`: `dim` of the weight, in
    `groups` blocks for a grouped conv's A (a grouped B holds rank / groups input channels per output channel)."""
    weight = module.weight
    width = rank // module.groups if isinstance(module, nn.Conv2d) and dim == 1 else rank
    if weight.shape[dim] == width:
        return module
    new_weight = padded_grouped(weight.detach(), width, dim, groups)
    if isinstance(module, nn.Conv2d):
        c_out, c_in = new_weight.shape[0], new_weight.shape[1] * module.groups
        new = nn.Conv2d(c_in, c_out, module.kernel_size, module.stride, module.padding, module.dilation,
                        groups=module.groups, bias=module.bias is not None, padding_mode=module.padding_mode,
                        device=weight.device, dtype=weight.dtype)
    else:
        new = nn.Linear(new_weight.shape[1], new_weight.shape[0], bias=module.bias is not None,
                        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(new_weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.weight.requires_grad_(weight.requires_grad)
    if module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    return new


def _pad_factors(model: nn.Module, target_rank: int) -> bool:
    found = False
    for layer in _root(model).modules():
        if not isinstance(layer, LoraLayer) or type(layer).__name__ not in ("Linear", "Conv2d"):
            continue
        found = True
        for name in list(layer.lora_A.keys()):
            layer.lora_A[name] = _padded_module(layer.lora_A[name], target_rank, 0, _groups(layer))
            layer.lora_B[name] = _padded_module(layer.lora_B[name], target_rank, 1)
    return found


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: Optional[int] = None, config: Union[None, object, dict] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make later swaps free of recompilation: scales become tensors and, with `target_rank` (the largest rank to be
    swapped in), every LoRA Linear / Conv2d factor is zero-padded to it (the output is unchanged). Call it after
    loading the first adapter and before `torch.compile`. With `config` (a LoraConfig or a dict of them), their
    `r` and `rank_pattern` values are set to `target_rank`."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' "
                         "instead.")
    if target_rank is not None and (not isinstance(target_rank, int) or target_rank <= 0):
        raise ValueError(f"Invalid target_rank={target_rank!r}: expected a positive int or None.")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled; "
                          "this will likely cause a recompilation. Call it before compiling the model.")
    if target_rank is not None:
        _check_target_rank(model, target_rank)
    found = _scales_to_tensors(model)
    if target_rank is not None:
        found = _pad_factors(model, target_rank) or found
    if not found:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if config is None or target_rank is None:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        if lora_config.rank_pattern:
            lora_config.rank_pattern = {key: target_rank for key in lora_config.rank_pattern}


def _check_target_rank(model: nn.Module, target_rank: int) -> None:
    """Every factor's rank must fit into `target_rank`, and a grouped conv's must split into its groups."""
    too_large = [(n, _rank_of(n, p)) for n, p in _root(model).named_parameters() if (_rank_of(n, p) or 0) > target_rank]
    if too_large:
        name, rank = too_large[0]
        raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is "
                         f"larger ({rank}) in {name}. This is not possible.")
    for layer in _root(model).modules():
        groups = _groups(layer)
        if target_rank % groups:
            raise ValueError(f"Trying to pad a {type(layer).__name__} LoRA adapter with groups={groups} to target rank "
                             f"{target_rank}, but the target rank is not divisible by {groups}. Please choose a "
                             f"target rank that is divisible by {groups}.")


def _rank_of(name: str, param: torch.Tensor) -> Optional[int]:
    """Rank held by a LoRA Linear / Conv2d factor parameter named `name`, else None."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-3] not in ("lora_A", "lora_B"):
        return None
    return param.shape[_FACTORS[parts[-3]]]
