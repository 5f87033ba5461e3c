"""Upstream PEFT's spelling of LoRA-GA, so its users can switch without rewriting:

    from peft.tuners.lora import LoraGAConfig, preprocess_loraga     # LoraGAConfig here: the sub-config below

    lora_config = LoraConfig(r=8, target_modules=[...], init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable"))   # or a dict
    preprocess_loraga(model, lora_config, train_step)     # train_step(): forward + backward on some batches
    model = get_peft_model(model, lora_config)

It reaches the same initialisation as `peft.LoraGAConfig` + `LoraGAContext` (this package's math, which follows the
paper: see docs/loraga.md for how upstream's differs). Two names, two classes: `peft.tuners.lora.LoraGAConfig` is
upstream's sub-config (`LoraGASubConfig`, the init options alone), `peft.LoraGAConfig` stays this package's tuner
config (a LoraConfig with the options as fields; given as `lora_ga_config` it reads as the sub-config too).

The gradients wait outside the model (`context.register_gradients`) and are dropped as the layers are initialised.
As upstream documents, `preprocess_loraga` also shows each target's gradient as `module._peft_loraga_grad` (the
same tensor, no copy) until the init uses it; the init removes the attribute.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .context import UPSTREAM_GRAD_ATTR, register_gradients, unwrap_model

_UPSTREAM_SUFFIX = f".{UPSTREAM_GRAD_ATTR}"  # the keys of upstream PEFT's preprocess_loraga cache file


@dataclass
class LoraGASubConfig:
    """The LoRA-GA init options of `LoraConfig(init_lora_weights="lora_ga", lora_ga_config=...)`, exported as
    `peft.tuners.lora.LoraGAConfig` (upstream PEFT's name and fields; `dtype` is this package's addition).

    Args:
        direction: which singular vectors of the gradient go to A and B: "ArB2r" (A = V^T[0:r], B = U[:, r:2r]),
            "A2rBr", "ArBr" or "random".
        scale: "stable" (`m**0.25 / sqrt(stable_gamma)`), "gd_scale" / "gd" (`1 / s`), "unit", or "weight_svd" /
            "weightS" (from W's spectrum). Upstream's and the official code's names both work; the math is this
            package's (docs/loraga.md).
        stable_gamma: the gamma of the stable scale.
        dtype: precision of the init math and of A, B as stored ("fp32", "fp64", "bf16", "fp16"; see
            `peft.LoraGAConfig`). Upstream PEFT ignores this key when it reads the config.
    Values are checked when the object is built (ValueError naming the field); the spelling given is kept."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        from .config import LoraGAInitOptions

        LoraGAInitOptions.from_any(self)

    @classmethod
    def from_value(cls, value) -> "LoraGASubConfig":
        """From a dict (as read from adapter_config.json, which may hold a whole saved `peft.LoraGAConfig`), this
        class, or any object with the option attributes (e.g. a `peft.LoraGAConfig`); the spelling is kept."""
        from .config import LoraGAInitOptions

        if isinstance(value, cls):
            return value
        LoraGAInitOptions.from_any(value)  # unknown dict keys and bad values: ValueError
        get = value.get if isinstance(value, dict) else (lambda k, d: getattr(value, k, d))
        return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})


def _check_request(lora_config) -> None:
    if getattr(lora_config, "init_lora_weights", None) != "lora_ga":
        raise ValueError("If you want to use LoRA-GA, build the LoraConfig with init_lora_weights='lora_ga' (and "
                         "optionally lora_ga_config=LoraGAConfig(...)); got init_lora_weights="
                         f"{getattr(lora_config, 'init_lora_weights', None)!r}.")
    LoraGASubConfig.from_value(lora_config.lora_ga_config or {})  # validate early


def _estimation_targets(model: nn.Module, lora_config) -> dict[str, nn.Module]:
    """Normalized name -> module for the targets whose float weight gradient `train_step` can give; a quantized
    target is refused (its weight has no float gradient)."""
    from .estimate import supported_weight_modules
    from .quant import is_quantized

    with_quantized = supported_weight_modules(model, lora_config, quantized=True)
    quantized = sorted(k for k, m in with_quantized.items() if is_quantized(m) or hasattr(m, "quant_state"))
    if quantized:
        raise ValueError(f"preprocess_loraga needs full-precision weight gradients, but the targets {quantized} are "
                         "quantized. For a quantized base, estimate with peft.utils.lora_ga_utils.estimate_gradient("
                         "model, batches, low_rank=k) and call get_peft_model inside LoraGAContext.")
    modules = supported_weight_modules(model, lora_config)
    if not modules:
        raise ValueError("No supported layers found: lora_config's target_modules match no Linear, Conv1D, Embedding "
                         "or Conv2d layer of the model.")
    return modules


def _estimate(model: nn.Module, modules: dict[str, nn.Module], train_step: Callable[[], None]):
    """(name -> mean fp32 gradient on the CPU for the targets some backward pass reached, names of the others)."""
    from .estimate import capture_gradients

    with capture_gradients(model, modules) as acc:
        train_step()
    reached = {name for key, names in acc.names.items() if acc.counts.get(key) for name in names}
    if not reached:
        raise ValueError(f"No supported layers found with a gradient: train_step() ran no backward pass through "
                         f"the targets {sorted(modules)}.")
    grads = {k: v.cpu() for k, v in acc.result().items() if k in reached}
    return grads, frozenset(modules) - reached


def preprocess_loraga(model: nn.Module, lora_config, train_step: Callable[[], None],
                      cache_file: Optional[str] = None) -> None:
    """Estimate the LoRA-GA gradients of `lora_config`'s targets by running `train_step()` (which does forward and
    backward passes) and keep them until `get_peft_model(model, lora_config)` initialises the layers.

    Each weight's gradient is averaged over the backward passes that reached it, in fp32. Targets that no backward
    pass reached get no gradient, and LoRA's default init at `get_peft_model` (with a warning). `cache_file`: load
    the gradients from it when it exists (written with `torch.save`, read with `weights_only=True`; a cache written by
    upstream PEFT, keyed `"<module>._peft_loraga_grad"`, reads too), else save them. Raises ValueError (model
    unchanged) without `init_lora_weights="lora_ga"`, for quantized targets, or when no target gets a gradient."""
    _check_request(lora_config)
    modules = _estimation_targets(model, lora_config)
    unreached = frozenset()
    if cache_file is not None and os.path.isfile(cache_file) and os.path.getsize(cache_file) > 0:
        named_grad = torch.load(cache_file, map_location="cpu", weights_only=True)
        named_grad = {k.removesuffix(_UPSTREAM_SUFFIX): v for k, v in named_grad.items()}
    else:
        named_grad, unreached = _estimate(model, modules, train_step)
        if cache_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
            torch.save(named_grad, cache_file)
    register_gradients(model, named_grad, unreached=unreached)
    for name, grad in named_grad.items():  # upstream's documented view of them, removed by the init
        if name in modules:
            setattr(modules[name], UPSTREAM_GRAD_ATTR, grad)


def unreached_fallback(model: nn.Module, layer, adapter_name: str, name: str) -> bool:
    """For a target of `preprocess_loraga` that no backward pass reached: LoRA's default init (B = 0, base
    unchanged) with a warning, and True; False for any other module (whose missing gradient is an error)."""
    import warnings

    from .context import unreached_targets

    if name not in unreached_targets(unwrap_model(model)):
        return False
    warnings.warn(f"LoRA-GA: no backward pass of preprocess_loraga's train_step reached {name!r}; it keeps LoRA's "
                  "default init (B = 0) and its base weight is not offset.")
    layer.reset_lora_parameters(adapter_name, True)
    return True
