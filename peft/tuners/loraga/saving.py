"""The two LoRA-GA saves (DESIGN.md 4.5; arXiv 2407.05000 keeps `W - s B0 A0` as the frozen base).

The trained adapter only works on the offset base `W - s B0 A0`. `save_loraga_model_init` stores A0, B0;
`save_loraga_model_final` writes a plain LoRA (peft_type LORA) of rank 2r for the ORIGINAL base:

    W - s B0 A0 + s B A = W + s [B, -B0] [A; A0]      (A' = [A; A0], B' = [B, -B0])

with `lora_alpha -> 2 alpha` (rsLoRA: `sqrt(2) alpha`) so the scale stays `s`, and rank/alpha patterns converted
the same way. The model in memory is not touched. An init folder is checked before it is used
(`read_initial_factors`): it must belong to the adapter being saved and to this run (`provenance`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from ...utils.constants import CONFIG_NAME
from ...utils.save_and_load import get_peft_model_state_dict, load_peft_weights, save_adapter_folder
from ..lora.config import LoraConfig
from .init_math import final_alpha, final_factors, final_patterns
from .provenance import check_initial_factors, factor_items, read_record, write_record

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
    save_adapter_folder(folder, state, config)  # one save, as PeftModel.save_pretrained writes it


def _is_main(is_main_process: Optional[bool]) -> bool:
    if is_main_process is not None:
        return is_main_process
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_loraga_model_init(model: nn.Module, save_dir: str, adapter_name: Optional[str] = None,
                           is_main_process: Optional[bool] = None) -> str:
    """Store the initial factors A0, B0 (right after `get_peft_model`, before training) in
    `save_dir/loraga_init` as a plain rank-r LoRA adapter, with `loraga_init.json` beside it (the adapter name and
    a fingerprint of every factor: `provenance`); returns that folder."""
    name = _adapter(model, adapter_name)
    folder = os.path.join(save_dir, INIT_SUBFOLDER)
    if _is_main(is_main_process):
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        _write(model, state, plain_lora_config(model.peft_config[name]), folder)
        write_record(folder, name, state)
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
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    # checked on every process, so that all of them raise together
    init_state = read_initial_factors(model, name, init_dir, state) if os.path.isdir(init_dir) else in_memory
    if _is_main(is_main_process):
        weights, config = final_form(state, init_state, model.peft_config[name])
        _write(model, weights, config, save_dir)
    return save_dir


def read_initial_factors(model: nn.Module, adapter_name: str, folder: str,
                         state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A0, B0 (on-disk keys) of adapter `adapter_name` of `model` (a PeftModel) from the initial adapter in `folder`:
    a plain rank-r LoRA (`save_loraga_model_init`, or `save_pretrained` of a LoRA-GA adapter of the upstream spelling
    right after the init), or the rank-2r saved form of a `LoraGAModel` (its `save_pretrained` right after the init,
    or any checkpoint of the same run), whose A0, B0 are `A'[r:]`, `-B'[:, r:]`.

    Refused with a ValueError naming what differs: a folder written for another adapter (`loraga_init.json`), whose
    factors do not have the keys and shapes of the adapter's trained factors in `state`, whose scale is not the
    adapter's, or whose factors are not bit for bit the ones the model recorded when it offset its base."""
    from ..lora.functional import lora_scaling
    from ..target_matching import pattern_value

    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"No initial adapter in {folder!r}: expected {CONFIG_NAME} and the adapter weights, "
                                "as save_loraga_model_init (or save_pretrained right after the LoRA-GA init) writes.")
    saved, init_state = _saved_lora_fields(config_path), load_peft_weights(folder)
    layers = _layer_table(model, adapter_name)
    split = split_final_state_dict(init_state, layers, saved)
    if split is not None:
        init = {k: t for key, (key_A, key_B, _, _) in layers.items() for k, t in zip((key_A, key_B), split[1][key])}
    else:
        init = factor_items(init_state)
    check_initial_factors(init, adapter_name=adapter_name, source=repr(folder),
                          expected_shapes={k: tuple(v.shape) for k, v in factor_items(state).items()},
                          recorded=recorded_fingerprints(model, adapter_name), record=read_record(folder))
    for key, (_, _, r, scaling) in layers.items() if split is None else ():  # (split checked the 2r scale)
        folder_scaling = lora_scaling(pattern_value(key, saved.alpha_pattern, saved.lora_alpha), r, saved.use_rslora)
        if not math.isclose(folder_scaling, scaling, rel_tol=1e-6):
            raise ValueError(f"{folder!r} holds a LoRA with scale {folder_scaling!r} at {key!r}, but adapter "
                             f"{adapter_name!r} has scale {scaling!r} there: its base was not offset with these "
                             "factors (same r, lora_alpha, use_rslora and patterns are needed).")
    return init


def _saved_lora_fields(config_path: str) -> SimpleNamespace:
    """The scale-related fields of a saved LoRA config (read as JSON: an upstream file may carry fields this
    package does not know)."""
    from ...config import PeftConfig

    data = PeftConfig.from_json_file(config_path)
    return SimpleNamespace(lora_alpha=data.get("lora_alpha", 8), use_rslora=bool(data.get("use_rslora", False)),
                           alpha_pattern=dict(data.get("alpha_pattern") or {}))


def _layer_table(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, str, int, float]]:
    """module key -> (on-disk key of A, of B, rank r, scale s) for every layer of adapter `adapter_name`."""
    from .model import _file_keys, adapter_layers

    return {key: (*_file_keys(key, layer), layer.r[adapter_name], layer.scaling[adapter_name])
            for key, layer in adapter_layers(model.base_model, adapter_name)}


def recorded_fingerprints(model: nn.Module, adapter_name: str) -> Optional[dict[str, str]]:
    """The fingerprints of A0, B0 the LoRA-GA init of `adapter_name` recorded on the tuner, or None."""
    from ..lora.model import LoraModel
    from .model import init_fingerprints

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, LoraModel) or adapter_name not in tuner.peft_config:
        return None
    return init_fingerprints(tuner).get(adapter_name)


def _recorded_init_state(model: nn.Module, adapter_name: str) -> Optional[dict[str, torch.Tensor]]:
    """A0, B0 of `adapter_name` under their on-disk keys, as the LoRA-GA tuner recorded them; None if it did not."""
    from .model import LoraGAModel

    tuner = getattr(model, "base_model", None)
    return tuner.init_state_dict(adapter_name) if isinstance(tuner, LoraGAModel) else None
