"""How an AdaLoRA adapter with a rank pattern is written: upstream's format.

After allocation the layers still hold `init_r` triplets, the masked ones with `lora_E = 0`. The file holds only
the kept triplets (rows of `lora_A` / `lora_E`, columns of `lora_B`) and the config's `rank_pattern` with the
adapter name dropped from its keys (`<path>.lora_E`); loading creates each layer at the kept rank (see
`AdaLoraModel._create_and_replace`).
"""

from __future__ import annotations

import copy

import torch

from .allocator import masks_by_path

_ROW_FACTORS = ("lora_A", "lora_E")  # triplets are rows; lora_B's are columns


def saved_rank_pattern(rank_pattern: dict, adapter_name: str) -> dict[str, list[bool]]:
    """The rank pattern as written to `adapter_config.json`: keys `<path>.lora_E`."""
    return {f"{path}.lora_E": mask for path, mask in masks_by_path(rank_pattern, adapter_name).items()}


def keep_triplets(weights: dict[str, torch.Tensor], masks: dict[str, list[bool]],
                  prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """`weights` (on-disk keys `<prefix><path>.lora_A` / `lora_E` / `lora_B`) with only the kept triplets of each
    layer in `masks` (`{path: keep mask}`); a tensor already at the kept rank is left as it is."""
    out = dict(weights)
    for path, mask in masks.items():
        keep = torch.tensor(mask, dtype=torch.bool)
        rank = int(keep.sum())
        for attr in ("lora_A", "lora_E", "lora_B"):
            key = f"{prefix}{path}.{attr}"
            if key not in out:
                continue
            tensor = out[key]
            dim = 0 if attr in _ROW_FACTORS else 1
            if tensor.shape[dim] == rank:
                continue
            if tensor.shape[dim] != keep.numel():
                raise ValueError(f"Invalid rank_pattern[{path!r}] of length {keep.numel()}: expected the rank of "
                                 f"{key}, {tensor.shape[dim]}.")
            out[key] = tensor[keep.to(tensor.device)] if dim == 0 else tensor[:, keep.to(tensor.device)]
    return out


def adapter_to_save(adapter_name: str, weights: dict, config) -> tuple[dict, object]:
    """(weights, config) as written for adapter `adapter_name`: unchanged without a rank pattern; else the kept
    triplets and a copy of the config whose rank pattern keys drop the adapter name (the live config is kept)."""
    if not config.rank_pattern:
        return weights, config
    masks = masks_by_path(config.rank_pattern, adapter_name)
    saved = copy.copy(config)
    saved.rank_pattern = saved_rank_pattern(config.rank_pattern, adapter_name)
    return keep_triplets(weights, masks), saved


def expand_triplets(weights: dict[str, torch.Tensor], masks: dict[str, list[bool]], ranks: dict[str, int],
                    prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """The inverse of `keep_triplets` for layers still at their full rank (`ranks[path] == len(mask)`): each file
    tensor at the kept rank is put back in the full shape, zeros for the masked triplets (E = 0 there, so the layer
    computes the same update)."""
    out = dict(weights)
    for path, mask in masks.items():
        keep = torch.tensor(mask, dtype=torch.bool)
        if ranks.get(path) != keep.numel():
            continue
        for attr in ("lora_A", "lora_E", "lora_B"):
            key = f"{prefix}{path}.{attr}"
            tensor = out.get(key)
            dim = 0 if attr in _ROW_FACTORS else 1
            if tensor is None or tensor.shape[dim] != int(keep.sum()) or tensor.shape[dim] == keep.numel():
                continue
            shape = list(tensor.shape)
            shape[dim] = keep.numel()
            full = tensor.new_zeros(shape)
            if dim == 0:
                full[keep.to(tensor.device)] = tensor
            else:
                full[:, keep.to(tensor.device)] = tensor
            out[key] = full
    return out
