"""Is an optional dependency importable? Upstream's import path (`peft.import_utils`), for code that checks before
importing a backend. Each check looks for the package without importing it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import lru_cache

from packaging import version


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@lru_cache
def is_bnb_available() -> bool:
    return _installed("bitsandbytes")


@lru_cache
def is_bnb_4bit_available() -> bool:
    if not is_bnb_available():
        return False
    import bitsandbytes as bnb

    return hasattr(bnb.nn, "Linear4bit")


@lru_cache
def is_diffusers_available() -> bool:
    return _installed("diffusers")


def _transformers_at_least(spec: str) -> bool:
    """Flags computed once at import, as upstream exposes them (bools, not functions)."""
    try:
        return version.parse(importlib.metadata.version("transformers")) >= version.parse(spec)
    except importlib.metadata.PackageNotFoundError:
        return False


is_transformers_ge_v5 = _transformers_at_least("5.0.0.dev0")
is_transformers_ge_v5_1_0 = _transformers_at_least("5.1.0")
is_transformers_ge_v5_4_0 = _transformers_at_least("5.4.0")
is_transformers_ge_v5_6_0 = _transformers_at_least("5.6.0.dev0")
is_transformers_ge_v5_13_0 = _transformers_at_least("5.13.0.dev0")
is_transformers_ge_v5_17_0 = _transformers_at_least("5.17.0")
is_transformers_le_4_53 = not _transformers_at_least("4.54.0.dev0")


@lru_cache
def is_xpu_available(check_device: bool = False) -> bool:
    import torch

    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return False
    if check_device:
        try:
            torch.xpu.device_count()
        except RuntimeError:
            return False
    return True


def is_torch_tpu_available(check_device: bool = True) -> bool:
    return False  # no TPU backend here


def _never() -> bool:
    return False


# Quantization backends this package has no LoRA layers for: reported as unavailable even when installed, so code
# that branches on them takes its fallback path instead of building layers we do not dispatch.
is_gptqmodel_available = is_optimum_available = is_aqlm_available = is_eetq_available = _never
is_hqq_available = is_inc_available = is_torchao_available = is_te_available = is_te_pytorch_available = _never
