"""CorDA (Yang et al. 2024, arXiv 2406.05223): context-oriented decomposition of W from input covariances.

With C = mean over calibration calls of X^T X (n, n) for a layer's inputs X (tokens, n), each call's X divided by
|max(X)| as upstream does (the scale of C cancels in s B A), and W (m, n):

    C_d = C + d * mean(diag C) * I          (d = 0.01, doubled until ||C_d C_d^-1 - I||_F < 0.05)
    W C_d = U S Vh,   V = (Vh C_d^-1)^T     so that  U S V^T = W  exactly

"ipm" (instruction-previewed) keeps the top-r triplets, "kpm" (knowledge-preserved) the bottom r. The adapter is
`A = sqrt(S_r / s) V_r^T` (r, n), `B = U_r sqrt(S_r / s)` (m, r) and the base keeps `W - s B A`, so the output is
unchanged at init.

Usage as upstream: `preprocess_corda(model, lora_config, run_model=..., hooked_model=None)` sets `module.eigens`
(a `CordaEigens` with `S_WC`, `U_WC`, `V_WC`, cropped to each module's rank) on every target Linear / Conv1D, then
`get_peft_model(model, lora_config)` with `init_lora_weights="corda"` consumes it (and deletes it). Cache files keep
upstream's format: `{"<name>.eigens.S_WC": ..., ...}` and `{"<name>": covariance}`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from torch import nn

_METHODS = ("ipm", "kpm")
_TEMPORARY = ("sample_count", "covariance_matrix", "corda_method", "rank")
_KEYS = ("S_WC", "U_WC", "V_WC")


@dataclass
class CordaConfig:
    """Upstream's `corda_config`: cache_file (SVD cache to write / reuse), covariance_file (covariance to write /
    reuse), corda_method ("ipm" or "kpm"), verbose, use_float16_for_covariance, prune_temporary_fields (delete
    `sample_count`, `covariance_matrix`, `corda_method`, `rank` from the modules after preprocessing)."""

    cache_file: Optional[str] = field(default=None, metadata={"help": "File for the cropped SVD (eigens) cache."})
    covariance_file: Optional[str] = field(default=None, metadata={"help": "File for the input covariances."})
    corda_method: Literal["ipm", "kpm"] = field(default="ipm", metadata={"help": "'ipm' (top r) or 'kpm' (bottom r)."})
    verbose: bool = field(default=False, metadata={"help": "Print progress."})
    use_float16_for_covariance: bool = field(default=False, metadata={"help": "Accumulate covariances in fp16."})
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Delete preprocessing fields afterwards."})

    def __post_init__(self):
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.fspath(value))
        if self.corda_method not in _METHODS:
            raise ValueError(f"Invalid corda_method={self.corda_method!r}: expected 'ipm' or 'kpm'.")


@dataclass
class CordaEigens:
    """`U_WC` (m, r), `S_WC` (r,), `V_WC` (n, r) of one layer (upstream's attribute names)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


# --- pure math ----------------------------------------------------------------------------------------------------
def damped_covariance(cov: torch.Tensor, start: float = 0.01, tol: float = 0.05):
    """(C_d, C_d^-1): `cov` (n, n) plus `d * mean(diag cov) * I`, d doubled from `start` until the inverse is good."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    level = torch.diagonal(cov).mean()
    damp = start
    for _ in range(64):
        fixed = cov + damp * level * eye
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < tol:
            return fixed, inverse
        damp *= 2
    raise ValueError("CorDA: the input covariance could not be inverted even with heavy damping; check that the "
                     "calibration data is not degenerate (all zeros, too few tokens).")


def covariance_svd(weight: torch.Tensor, cov: torch.Tensor) -> CordaEigens:
    """Full CorDA decomposition of `weight` (m, n) under `cov` (n, n): `U diag(S) V^T == weight`."""
    fixed, inverse = damped_covariance(cov)
    U, S, Vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    return CordaEigens(S_WC=S, U_WC=U, V_WC=(Vh @ inverse).T)


def crop(eigens: CordaEigens, r: int, method: str) -> CordaEigens:
    """Keep the top-r ("ipm") or bottom-r ("kpm") triplets, as new tensors."""
    if method not in _METHODS:
        raise ValueError(f"Invalid corda_method={method!r}: expected 'ipm' or 'kpm'.")
    part = slice(0, r) if method == "ipm" else slice(eigens.S_WC.shape[0] - r, None)
    return CordaEigens(S_WC=eigens.S_WC[part].clone(), U_WC=eigens.U_WC[:, part].clone(),
                       V_WC=eigens.V_WC[:, part].clone())


def corda_factors(eigens: CordaEigens, scaling: float):
    """(A (r, n), B (m, r)) with `s B A = U diag(S) V^T`."""
    root = torch.sqrt(eigens.S_WC / scaling)  # (r,)
    return (eigens.V_WC * root[None, :]).T.contiguous(), (eigens.U_WC * root[None, :]).contiguous()


# --- model pass ---------------------------------------------------------------------------------------------------
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def corda_targets(model: nn.Module, config):
    """(name, module) of the Linear / Conv1D modules `config` targets."""
    from ..target_matching import is_target

    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) or _is_conv1d(module)) and config.target_modules is not None \
                and is_target(config, name):
            yield name, module


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight.T if _is_conv1d(module) else weight  # (out, in)


def _device(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)
    return next(iter(model.parameters())).device


def _options(lora_config) -> CordaConfig:
    options = getattr(lora_config, "corda_config", None)
    if options is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (a CordaConfig); got None.")
    return options


def _accumulate(module: nn.Module, inputs, use_fp16: bool) -> None:
    x = inputs[0].detach()
    x = x.reshape(-1, x.shape[-1])  # (tokens, n)
    if not use_fp16:
        x = x.float()
    top = x.max().abs()  # upstream's normalisation (the largest entry, not the largest magnitude): same files
    x = x / (top if top > 0 else x.abs().max().clamp_min(torch.finfo(x.dtype).tiny))
    if not torch.isfinite(x).all():
        raise ValueError(f"CorDA: non-finite inputs reached {type(module).__name__}; check the calibration data.")
    module.covariance_matrix = module.covariance_matrix + x.T @ x
    module.sample_count += 1


def _covariance_hook(use_fp16: bool):
    def hook(module, inputs, output):
        _accumulate(module, inputs, use_fp16)

    return hook


@torch.no_grad()
def collect_covariances(model: nn.Module, config, run_model, hooked_model=None) -> None:
    """Set `covariance_matrix` (mean of X^T X over the calls) and `sample_count` on every target module."""
    options = _options(config)
    path = options.covariance_file
    if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
        saved = torch.load(path, map_location=_device(model), weights_only=True)
        for name, module in corda_targets(model, config):
            module.covariance_matrix = saved[name]
        return
    if run_model is None:
        raise ValueError("preprocess_corda needs run_model when neither cache_file nor covariance_file exists.")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    handles = []
    for _, module in corda_targets(hooked, config):
        module.sample_count, module.covariance_matrix = 0, 0
        handles.append(module.register_forward_hook(_covariance_hook(options.use_float16_for_covariance)))
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    if hooked is not model:
        found = dict(corda_targets(hooked, config))
        for name, module in corda_targets(model, config):
            if name in found:
                module.sample_count = found[name].sample_count
                module.covariance_matrix = found[name].covariance_matrix
    for name, module in corda_targets(model, config):
        if not getattr(module, "sample_count", 0):
            raise ValueError(f"CorDA: run_model never called target module {name!r}; no covariance to build.")
        module.covariance_matrix = module.covariance_matrix / module.sample_count
    if path is not None:
        _save({name: m.covariance_matrix for name, m in corda_targets(model, config)}, path)


def _save(data: dict, path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save(data, path)


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """Attach `eigens` (cropped to each module's rank) to every CorDA target module of `model` (see module doc)."""
    from ..target_matching import pattern_value

    options = _options(lora_config)
    device = _device(model)
    cache = options.cache_file
    if cache is not None and os.path.exists(cache) and os.path.getsize(cache) > 0:
        saved = torch.load(cache, map_location=device, weights_only=True)
        for name, module in corda_targets(model, lora_config):
            module.eigens = CordaEigens(*(saved[f"{name}.eigens.{k}"] for k in _KEYS))
        return
    targets = list(corda_targets(model, lora_config))
    for name, module in targets:
        module.corda_method = options.corda_method
        module.rank = pattern_value(name, lora_config.rank_pattern or {}, lora_config.r)
    collect_covariances(model, lora_config, run_model, hooked_model)
    for name, module in targets:
        if options.verbose:
            print(f"CorDA: decomposing {name}")
        module.eigens = _layer_eigens(name, module, device)
    if options.prune_temporary_fields:
        for _, module in targets:
            for attr in _TEMPORARY:
                if hasattr(module, attr):
                    delattr(module, attr)
    if cache is not None:
        _save({f"{name}.eigens.{k}": getattr(m.eigens, k) for name, m in targets for k in _KEYS}, cache)


def _layer_eigens(name: str, module: nn.Module, device) -> CordaEigens:
    full = covariance_svd(_weight_of(module), module.covariance_matrix.float())
    if module.rank > full.S_WC.shape[0]:
        raise ValueError(f"Invalid r={module.rank} for CorDA on {name!r}: at most min(in, out) = {full.S_WC.shape[0]}.")
    eigens = crop(full, module.rank, module.corda_method)
    return CordaEigens(*(getattr(eigens, k).to(device) for k in _KEYS))


def corda_init_layer(layer, adapter_name: str) -> None:
    """Set A, B of `layer`'s adapter from `base.eigens` and leave `W - s B A` in the base (then drop `eigens`)."""
    from .init_methods import _read_weight, _set_factors, _write_weight, residual_weight

    base = layer.get_base_layer()
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ValueError("init_lora_weights='corda': the layer has no `eigens`; run "
                         "peft.tuners.lora.corda.preprocess_corda(model, lora_config, run_model) first.")
    r = layer.r[adapter_name]
    weight, quantized = _read_weight(layer)
    m, n = weight.shape
    shapes = (tuple(eigens.U_WC.shape), tuple(eigens.S_WC.shape), tuple(eigens.V_WC.shape))
    if shapes != ((m, r), (r,), (n, r)):
        raise ValueError(f"CorDA eigens of shapes U {shapes[0]}, S {shapes[1]}, V {shapes[2]} do not fit a layer with "
                         f"out={m}, in={n}, r={r}; build them with the same model and lora_config (rank) as "
                         "get_peft_model.")
    for key, tensor in zip(("S", "U", "V"), (eigens.S_WC, eigens.U_WC, eigens.V_WC)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"CorDA eigens: non-finite values in {key}.")
    scaling = layer.scaling[adapter_name]
    device = weight.device
    cropped = CordaEigens(*(t.float().to(device) for t in (eigens.S_WC, eigens.U_WC, eigens.V_WC)))
    A, B = corda_factors(cropped, scaling)
    _set_factors(layer, adapter_name, A, B)
    A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight  # as stored
    _write_weight(layer, residual_weight(weight, A.detach(), B.detach(), scaling), quantized)
    del base.eigens
