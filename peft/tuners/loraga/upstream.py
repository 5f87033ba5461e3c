"""Upstream PEFT's spelling of LoRA-GA, so its users can switch without rewriting:

    lora_config = LoraConfig(r=8, target_modules=[...], init_lora_weights="lora_ga",
                             lora_ga_config={"direction": "ArB2r", "scale": "stable"})
    preprocess_loraga(model, lora_config, train_step)     # train_step(): forward + backward on some batches
    model = get_peft_model(model, lora_config)

It reaches the same initialisation as `LoraGAConfig` + `LoraGAContext` (this package's math, which follows the
paper: see docs/loraga.md for how upstream's differs). The gradients wait outside the model and are dropped as the
layers are initialised.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from .config import LoraGAInitOptions
from .context import register_gradients

_UPSTREAM_SUFFIX = "._peft_loraga_grad"  # the keys of upstream PEFT's preprocess_loraga cache file


def preprocess_loraga(model: nn.Module, lora_config, train_step: Callable[[], None],
                      cache_file: Optional[str] = None) -> None:
    """Estimate the LoRA-GA gradients of `lora_config`'s targets by running `train_step()` (which does forward and
    backward passes) and keep them until `get_peft_model(model, lora_config)` initialises the layers.

    Each weight's gradient is averaged over the backward passes that reached it, in fp32. `cache_file`: load the
    gradients from it when it exists (written with `torch.save`, read with `weights_only=True`; a cache written by
    upstream PEFT, keyed `"<module>._peft_loraga_grad"`, reads too), else save them."""
    from ...utils.lora_ga_utils import capture_gradients, supported_weight_modules

    if getattr(lora_config, "init_lora_weights", None) != "lora_ga":
        raise ValueError(f"preprocess_loraga needs LoraConfig(init_lora_weights='lora_ga', ...), got "
                         f"init_lora_weights={getattr(lora_config, 'init_lora_weights', None)!r}.")
    LoraGAInitOptions.from_any(lora_config.lora_ga_config)  # validate early
    if cache_file is not None and os.path.isfile(cache_file) and os.path.getsize(cache_file) > 0:
        named_grad = torch.load(cache_file, map_location="cpu", weights_only=True)
        named_grad = {k.removesuffix(_UPSTREAM_SUFFIX): v for k, v in named_grad.items()}
    else:
        modules = supported_weight_modules(model, lora_config)
        if not modules:
            raise ValueError("lora_config's target_modules match no Linear/Conv1D/Embedding/Conv2d layer of the model.")
        with capture_gradients(model, modules) as acc:
            train_step()
        named_grad = {k: v.cpu() for k, v in acc.result().items()}
        if cache_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
            torch.save(named_grad, cache_file)
    register_gradients(model, named_grad)
