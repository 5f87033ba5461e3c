"""Small user-facing utilities around PEFT models (upstream's `peft.helpers` API).

- `check_if_peft_model(path_or_id)`: whether a folder / hub id holds a loadable adapter config.
- `rescale_adapter_scale(model, multiplier)`: scale every LoRA branch by `multiplier` inside a `with` block.
- `disable_input_dtype_casting(model)`: feed adapter branches the input in its own dtype inside a `with` block.
- `DoraCaching`: cache DoRA's weight norm `||W + dW||_c` between eval forwards (context or global switch).
- `find_kappa_target_modules(model)` / `KappaTuneSelector`: pick LoRA targets by weight condition number.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .tuners.lora import dora as _dora
from .tuners.tuner_layer import BaseTunerLayer


def check_if_peft_model(model_name_or_path: Union[str, "object"]) -> bool:
    """True when `model_name_or_path` (a local folder or hub id) has an `adapter_config.json` that parses into a
    PEFT config; False for a missing / unreachable / malformed one."""
    try:
        PeftConfig.from_pretrained(str(model_name_or_path))
    except Exception:  # noqa: BLE001 - any failure to load means "not a PEFT model" (upstream's contract)
        return False
    return True


def _scaled_layers(model: nn.Module) -> list[nn.Module]:
    """Tuner layers that scale their adapters' output by a per-adapter `scaling` dict (LoRA's and its variants')."""
    from .tuners.tuner_layer import BaseTunerLayer

    return [m for m in model.modules()
            if isinstance(m, BaseTunerLayer) and isinstance(getattr(m, "scaling", None), dict)]


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float) -> Iterator[None]:
    """Multiply the `scaling` of every adapter of every scaled tuner layer in `model` (LoRA's and the variants' that
    keep a per-adapter `scaling` dict) by `multiplier` for the duration of the block (LoRA: `y = base(x) + multiplier
    * s B A x`); the original scalings are restored on exit, also on error. Raises `TypeError` for a non-numeric
    multiplier and `ValueError` (upstream's message) when the model has no such layer."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    layers = _scaled_layers(model)
    if not layers:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    try:
        for layer, scaling in saved:
            layer.scaling.update({name: value * multiplier for name, value in scaling.items()})
        yield
    finally:
        for layer, scaling in saved:
            layer.scaling.clear()
            layer.scaling.update(scaling)


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Inside the block, adapter layers pass the input to their branches in its own dtype instead of casting it to
    the adapter weight's dtype (useful when hooks change weight dtypes on the fly, e.g. layerwise upcasting).
    `active=False` makes the block a no-op. Previous settings are restored on exit."""
    if not active:
        yield
        return
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    saved = [(layer, getattr(layer, "cast_input_dtype_enabled", True)) for layer in layers]
    try:
        for layer, _ in saved:
            layer.cast_input_dtype_enabled = False
        yield
    finally:
        for layer, value in saved:
            layer.cast_input_dtype_enabled = value


class DoraCaching:
    """Cache DoRA's channel norm `||W + s B A||_c` between forwards in eval mode (faster inference, more memory).

    `with DoraCaching(): ...` enables it for the block and restores the previous setting; `DoraCaching()(enabled)`
    switches it globally. Training-mode forwards never cache, and `train()`/`eval()`, `.to(...)`, a merge or any
    forward with caching off empty the caches, so results equal the uncached ones.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._previous: list[bool] = []

    def __enter__(self) -> "DoraCaching":
        self._previous.append(_dora.ENABLE_DORA_CACHING)
        _dora.ENABLE_DORA_CACHING = self.enabled
        return self

    def __exit__(self, *exc_info) -> None:
        _dora.ENABLE_DORA_CACHING = self._previous.pop()

    def __call__(self, enabled: bool = True) -> None:
        _dora.ENABLE_DORA_CACHING = bool(enabled)


def condition_number(weight: torch.Tensor, eps: float = 1e-8) -> float:
    """`kappa(W) = sigma_max / (sigma_min + eps)` of a matrix (rows = out; any trailing dims are flattened)."""
    singular_values = torch.linalg.svdvals(weight.reshape(weight.shape[0], -1).float())
    return (singular_values[0] / (singular_values[-1] + eps)).item()


def _pick(scores: dict[str, float], top_p: Optional[float], num_modules: Optional[int],
          threshold: Optional[float]) -> list[str]:
    """Names by ascending score: the first `num_modules`, else the first `max(1, int(n * top_p))`, else those with
    a score <= `threshold`, else all."""
    ranked = [name for name, _ in sorted(scores.items(), key=lambda item: item[1])]
    if not ranked:
        return []
    if num_modules is not None:
        return ranked[:num_modules]
    if top_p is not None:
        return ranked[: max(1, int(len(ranked) * top_p))]
    if threshold is not None:
        return [name for name in ranked if scores[name] <= threshold]
    return ranked


class KappaTuneSelector:
    """Ranks a model's weights by condition number (KappaTune): well-conditioned matrices (small `kappa`) are the
    preferred LoRA targets. `nn.Linear` modules give `target_modules` (`get_best_targets`); 3D fused-expert
    parameters whose names end in `moe_param_suffixes` give `target_parameters` (`get_best_target_parameters`,
    scored by the mean `kappa` over experts). Matrices with a dim above `max_dim_size_to_analyze` are skipped.
    """

    def __init__(self, model: nn.Module, max_dim_size_to_analyze: int = 16384,
                 moe_param_suffixes: Optional[tuple[str, ...]] = None, show_progress: bool = True) -> None:
        self.model = model
        self.max_dim_size_to_analyze = max_dim_size_to_analyze
        self.moe_param_suffixes = moe_param_suffixes or (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")
        self.show_progress = show_progress
        self._module_scores: Optional[dict[str, float]] = None
        self._parameter_scores: Optional[dict[str, float]] = None

    def _fits(self, shape) -> bool:
        return all(dim <= self.max_dim_size_to_analyze for dim in shape)

    def _progress(self, items: list, what: str):
        if not self.show_progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=f"Condition numbers ({what})")

    def _scores(self) -> tuple[dict[str, float], dict[str, float]]:
        if self._module_scores is None:
            from .utils.quantization import dequantize_bnb_layer, is_bnb_quantized_param

            linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
            self._module_scores = {}
            for name, module in self._progress(linears, "linear layers"):
                quantized = is_bnb_quantized_param(module.weight)
                weight = dequantize_bnb_layer(module) if quantized else module.weight.detach()
                if self._fits(weight.shape):
                    self._module_scores[name] = condition_number(weight)
            fused = [(n, p) for n, p in self.model.named_parameters()
                     if p.dim() == 3 and n.endswith(self.moe_param_suffixes)]
            self._parameter_scores = {}
            for name, param in self._progress(fused, "fused experts"):
                if self._fits(param.shape[1:]):
                    kappas = [condition_number(expert) for expert in param.detach()]
                    self._parameter_scores[name] = sum(kappas) / len(kappas)
        return self._module_scores, self._parameter_scores

    def get_best_targets(self, top_p: Optional[float] = None, num_modules: Optional[int] = None,
                         threshold: Optional[float] = None) -> list[str]:
        return _pick(self._scores()[0], top_p, num_modules, threshold)

    def get_best_target_parameters(self, top_p: Optional[float] = None, num_modules: Optional[int] = None,
                                   threshold: Optional[float] = None) -> list[str]:
        return _pick(self._scores()[1], top_p, num_modules, threshold)


def find_kappa_target_modules(model: nn.Module, top_p: float = 0.2, max_dim_size_to_analyze: int = 16384,
                              moe_param_suffixes: Optional[tuple[str, ...]] = None,
                              show_progress: bool = True) -> dict[str, Optional[list[str]]]:
    """`{"target_modules": [...], "target_parameters": [...] or None}`: the `top_p` best-conditioned linear modules
    and fused expert parameters of `model` (see `KappaTuneSelector`), ready for `LoraConfig`."""
    selector = KappaTuneSelector(model, max_dim_size_to_analyze, moe_param_suffixes, show_progress)
    parameters = selector.get_best_target_parameters(top_p=top_p)
    return {"target_modules": selector.get_best_targets(top_p=top_p), "target_parameters": parameters or None}
