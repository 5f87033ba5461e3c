"""The two LoRA-GA saves (DESIGN.md 4.5; arXiv 2407.05000 keeps `W - s B0 A0` as the frozen base).

The trained adapter only works on the offset base `W - s B0 A0`. `save_loraga_model_init` stores A0, B0;
`save_loraga_model_final` writes a plain LoRA (peft_type LORA) of rank 2r for the ORIGINAL base:

    W - s B0 A0 + s B A = W + s [B, -B0] [A; A0]      (A' = [A; A0], B' = [B, -B0])

with `lora_alpha -> 2 alpha` (rsLoRA: `sqrt(2) alpha`) so the scale stays `s`, and rank/alpha patterns converted
the same way. The model in memory is not touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
from torch import nn

from ...utils.save_and_load import get_peft_model_state_dict, load_peft_weights, save_adapter_weights
from ..lora.config import LoraConfig
from .init_math import final_alpha, final_factors, final_patterns

INIT_SUBFOLDER = "loraga_init"
_GA_FIELDS = ("bsz", "iters", "max_length", "direction", "dtype", "scale", "stable_gamma")
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def _adapter(model: nn.Module, adapter_name: Optional[str]) -> str:
    if adapter_name is None:
        active = model.active_adapter
        adapter_name = active if isinstance(active, str) else active[0]
    if adapter_name not in model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; available adapters: {sorted(model.peft_config)}.")
    return adapter_name


def plain_lora_config(config, **changes) -> LoraConfig:
    """A `LoraConfig` (peft_type LORA, default init) with `config`'s LoRA fields, then `changes` applied."""
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    data = {k: getattr(config, k) for k in names if hasattr(config, k) and k not in _GA_FIELDS}
    data.update(peft_type="LORA", init_lora_weights=True, lora_ga_config=None, inference_mode=True)
    data.update(changes)
    for key in ("rank_pattern", "alpha_pattern"):
        data[key] = dict(data.get(key) or {})
    data.pop("peft_version", None)
    return LoraConfig(**data)


def _write(model: nn.Module, state: dict, config: LoraConfig, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None)
    if config.base_model_name_or_path is None and name_or_path:
        config.base_model_name_or_path = name_or_path
    save_adapter_weights(state, folder)
    config.save_pretrained(folder)


def _is_main(is_main_process: Optional[bool]) -> bool:
    if is_main_process is not None:
        return is_main_process
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_loraga_model_init(model: nn.Module, save_dir: str, adapter_name: Optional[str] = None,
                           is_main_process: Optional[bool] = None) -> str:
    """Store the initial factors A0, B0 (right after `get_peft_model`, before training) in
    `save_dir/loraga_init` as a plain rank-r LoRA adapter; returns that folder."""
    name = _adapter(model, adapter_name)
    folder = os.path.join(save_dir, INIT_SUBFOLDER)
    if _is_main(is_main_process):
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        _write(model, state, plain_lora_config(model.peft_config[name]), folder)
    return folder


def final_state_dict(state: dict[str, torch.Tensor], init_state: dict[str, torch.Tensor]) -> dict:
    """On-disk adapter tensors of the rank-2r adapter: every (A, B) pair replaced by `([A; A0], [B, -B0])`,
    everything else (modules_to_save, biases) as trained."""
    out = dict(state)
    for key in state:
        for suffix_A, suffix_B in _PAIRS:
            if not key.endswith(suffix_A):
                continue
            key_B = key[: -len(suffix_A)] + suffix_B
            if key not in init_state or key_B not in init_state:
                raise ValueError(f"The initial adapter has no {key!r}/{key_B!r}: was save_loraga_model_init called "
                                 "on this model with the same targets?")
            out[key], out[key_B] = final_factors(state[key], state[key_B], init_state[key], init_state[key_B])
    return out


def final_config(config) -> LoraConfig:
    """The config of the rank-2r plain LoRA adapter that equals the trained LoRA-GA adapter on the original base."""
    ranks, alphas = final_patterns(config.rank_pattern, config.alpha_pattern, config.use_rslora)
    return plain_lora_config(config, r=2 * config.r, lora_alpha=final_alpha(config.lora_alpha, config.use_rslora),
                             rank_pattern=ranks, alpha_pattern=alphas)


def final_form(state: dict[str, torch.Tensor], init_state: dict[str, torch.Tensor], config) -> tuple[dict, LoraConfig]:
    """(tensors, config) of the rank-2r plain LoRA equal to the trained adapter `state` (on-disk keys) that was
    initialised with `init_state` (A0, B0 under the same keys), on the original base."""
    init_state = {k: v.to(state[k].device) if k in state else v for k, v in init_state.items()}
    return final_state_dict(state, init_state), final_config(config)


def split_final_state_dict(state: dict[str, torch.Tensor], layers: dict[str, tuple[str, str, int, float]],
                           saved_config) -> Optional[tuple[dict, dict]]:
    """The inverse of `final_form` for an adapter whose layers are `layers` (module key -> (on-disk key of A, of B,
    rank r, scale s)): `(state with A = A'[:r], B = B'[:, :r], {module key: (A0, B0)})` with `A0 = A'[r:]`,
    `B0 = -B'[:, r:]`. None when `state` does not hold rank-2r factors for every layer (e.g. an adapter saved before
    its LoRA-GA init: nothing to split; a plain load then checks the shapes). A ValueError when the saved scale is
    not the layer's (then `B' A'` is not `B A - B0 A0` of this adapter)."""
    if not all(a in state and b in state and state[a].shape[0] == 2 * r and state[b].shape[1] == 2 * r
               for a, b, r, _ in layers.values()):
        return None
    from ..lora.functional import lora_scaling
    from ..target_matching import pattern_value

    out, init = dict(state), {}
    for key, (key_A, key_B, r, scaling) in layers.items():
        alpha = pattern_value(key, getattr(saved_config, "alpha_pattern", None) or {}, saved_config.lora_alpha)
        saved = lora_scaling(alpha, 2 * r, getattr(saved_config, "use_rslora", False))
        if not math.isclose(saved, scaling, rel_tol=1e-6):
            raise ValueError(f"The folder holds a rank-{2 * r} LoRA for {key!r} with scale {saved!r}, but this LoRA-GA "
                             f"adapter's scale there is {scaling!r}: it is not this adapter's saved form (same r, "
                             "lora_alpha, use_rslora and patterns are needed).")
        A, B = state[key_A], state[key_B]
        out[key_A], out[key_B] = A[:r].contiguous(), B[:, :r].contiguous()
        init[key] = (A[r:].contiguous(), (-B[:, r:]).contiguous())
    return out, init


def save_loraga_model_final(model: nn.Module, save_dir: str, adapter_name: Optional[str] = None,
                            is_main_process: Optional[bool] = None) -> str:
    """Write into `save_dir` the plain LoRA adapter (rank 2r) that reproduces the trained model on the ORIGINAL
    base weights: `PeftModel.from_pretrained(original_base, save_dir)` (here or in upstream PEFT). A0, B0 come from
    `save_loraga_model_init(model, save_dir)` (from before training) when that folder exists, else from the
    model's own record of its init (`LoraGAModel`: what `save_pretrained` uses). The model in memory stays as it
    is."""
    name = _adapter(model, adapter_name)
    init_dir = os.path.join(save_dir, INIT_SUBFOLDER)
    in_memory = _recorded_init_state(model, name)
    if not os.path.isdir(init_dir) and in_memory is None:
        raise FileNotFoundError(f"No initial LoRA-GA adapter in {init_dir!r} and none recorded on the model: call "
                                f"save_loraga_model_init(model, save_dir={save_dir!r}) right after get_peft_model, "
                                "before training.")
    if _is_main(is_main_process):
        init_state = load_peft_weights(init_dir) if os.path.isdir(init_dir) else in_memory
        state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        weights, config = final_form(state, init_state, model.peft_config[name])
        _write(model, weights, config, save_dir)
    return save_dir


def _recorded_init_state(model: nn.Module, adapter_name: str) -> Optional[dict[str, torch.Tensor]]:
    """A0, B0 of `adapter_name` under their on-disk keys, as the LoRA-GA tuner recorded them; None if it did not."""
    from .model import LoraGAModel

    tuner = getattr(model, "base_model", None)
    return tuner.init_state_dict(adapter_name) if isinstance(tuner, LoraGAModel) else None
