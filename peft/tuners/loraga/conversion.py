"""Upstream PEFT's `save_pretrained` keywords that change what is written. `PeftModel.save_pretrained` calls
`adapter_save_form` once, before it writes anything, and saves each adapter in the form it returns.

`path_initial_model_for_weight_conversion=init_dir` (upstream's conversion for PiSSA / OLoRA / LoRA-GA): the
adapter was trained on a base offset by its initial factors, `W - s B0 A0`; A0, B0 are read from the initial adapter
in `init_dir` and the adapter is written as the plain rank-2r LoRA that fits the ORIGINAL base,

    W - s B0 A0 + s B A = W + s [B, -B0] [A; A0]      (r -> 2r, lora_alpha -> 2 alpha, rsLoRA sqrt(2) alpha)

the very files `save_loraga_model_final` writes. The flow, as upstream documents it:

    model = get_peft_model(base, LoraConfig(init_lora_weights="lora_ga", ...))   # or LoraGAConfig in LoraGAContext
    model.save_pretrained(init_dir)            # right after the init, before training
    ... train ...
    model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir)

`init_dir` may hold a plain rank-r adapter (upstream's spelling, `save_loraga_model_init`'s `loraga_init`) or the
rank-2r saved form of a `LoraGAModel` (its `save_pretrained` right after the init, or a checkpoint of the same run).
Adapters other than "default" are read from `init_dir/<name>` when that folder holds an adapter, as `save_pretrained`
lays them out. The conversion needs only the trained and the initial factors, so it also works on a model loaded
from the trained adapter in another process. `saving.read_initial_factors` refuses an init folder of another adapter
or run. Unlike upstream, the init folder is left as it is (upstream rewrites its config), `modules_to_save` and
trained biases are kept (upstream drops them), and rsLoRA with rank / alpha patterns works (upstream refuses it).

Refused by name, since ignoring them would save something else than the caller asked for:
`convert_pissa_to_lora` (upstream's former name of the keyword above) and `save_embedding_layers=True` (upstream then
also writes the base model's embedding weights; this package never does, which is what "auto" and False get here).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

from torch import nn

from ...utils.constants import CONFIG_NAME
from ...utils.peft_types import PeftType
from .saving import final_form, read_initial_factors

SaveForm = Callable[[str, dict, object], tuple[dict, object]]
KEYWORD = "path_initial_model_for_weight_conversion"
_CONVERTIBLE = (PeftType.LORA, PeftType.LORAGA)


def adapter_save_form(model: nn.Module, adapter_names: list[str], kwargs: dict) -> SaveForm:
    """`(name, weights, config) -> (weights, config)`: the form in which `save_pretrained` writes each adapter of
    `adapter_names` (weights under their on-disk keys). Pops from `kwargs` the upstream keywords handled here and
    raises for those that would change the saved result: all checked before anything is written."""
    path = kwargs.pop(KEYWORD, None)
    _refuse_unsupported(kwargs)
    tuner_form = getattr(getattr(model, "base_model", None), "adapter_to_save", None)  # LoRA-GA's saved form
    if path is None:
        return tuner_form if tuner_form is not None else _as_is
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{KEYWORD}={path!r} is not a folder: pass the folder of the initial adapter, saved "
                                "right after the LoRA-GA init (save_pretrained or save_loraga_model_init).")
    for name in adapter_names:
        _check_convertible(model, name)

    def convert(name: str, weights: dict, config) -> tuple[dict, object]:
        init = read_initial_factors(model, name, initial_folder(path, name), weights)
        return final_form(weights, init, config)

    return convert


def initial_folder(path: str, adapter_name: str) -> str:
    """Where the initial adapter of `adapter_name` is: `path/<name>` for a non-default adapter when that folder holds
    an adapter (save_pretrained's layout), else `path` itself."""
    nested = os.path.join(path, adapter_name)
    return nested if adapter_name != "default" and os.path.isfile(os.path.join(nested, CONFIG_NAME)) else path


def _as_is(name: str, weights: dict, config) -> tuple[dict, object]:
    return weights, config


def _check_convertible(model: nn.Module, adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    if config.peft_type not in _CONVERTIBLE:
        raise ValueError(f"{KEYWORD} converts a LoRA adapter trained on a base offset by its initial factors "
                         f"(LoRA-GA); adapter {adapter_name!r} is a {config.peft_type.value} adapter, which has no "
                         "such form: save it without the keyword.")
    init = getattr(config, "init_lora_weights", True)
    rewrites_base = isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda"))
    if rewrites_base and config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(f"Passing `{KEYWORD}` to `save_pretrained` is not supported for adapter {adapter_name!r}: "
                         f"init_lora_weights={init!r} with use_rslora=True and rank_pattern/alpha_pattern; the "
                         "converted adapter's per-layer rslora scale could not be expressed by its saved config. "
                         "Expected use_rslora=False or no rank_pattern/alpha_pattern.")
    if config.peft_type == PeftType.LORA and init not in ("lora_ga", True) and not rewrites_base:
        warnings.warn(f"{KEYWORD}: adapter {adapter_name!r} has init_lora_weights={init!r}, which does not offset the "
                      "base weights; the saved adapter is `B A - B0 A0`, the change since the initial adapter, not "
                      "the trained model. The keyword is meant for LoRA-GA adapters.")


def _refuse_unsupported(kwargs: dict) -> None:
    if "convert_pissa_to_lora" in kwargs:
        raise ValueError(f"save_pretrained(convert_pissa_to_lora=...) is upstream PEFT's former name of {KEYWORD}; "
                         f"pass {KEYWORD}=<folder of the initial adapter> instead.")
    embedding = kwargs.pop("save_embedding_layers", "auto")
    if embedding not in ("auto", False):
        raise ValueError(f"save_embedding_layers={embedding!r}: this package never writes the base model's embedding "
                         "weights into an adapter folder (upstream does, for resized or adapted embeddings); only "
                         "'auto' and False are accepted, and both write the adapter alone. Save resized embeddings "
                         "with the base model (model.get_base_model().save_pretrained(...)) instead.")
