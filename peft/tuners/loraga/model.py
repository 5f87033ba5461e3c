"""`LoraGAModel`: LoRA layers initialised from the estimated gradient (arXiv 2407.05000, Algorithm 1).

For each adapted layer with weight W (viewed as (m, n) = (out, in)) and gradient G: A, B from the SVD of G
(`init_math.lora_ga_factors`), stored in the adapter's dtype, then `W <- W - s B A` computed in fp32 from A and B
as stored and rounded once, so the model's output is unchanged at init. The gradients come from the open
`LoraGAContext` (or `preprocess_loraga`) for the model; nothing is kept on the layers afterwards. With
owner-only or sharded gradients, or an FSDP2-sharded model, `distributed.init_factors` runs each SVD on one rank.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from ..lora.layer import LoraLayer
from ..lora.model import LoraModel
from ..lora.param_wrapper import ParamWrapper, module_path
from . import distributed, quant, upstream
from .config import LoraGAInitOptions
from .context import active_gradients, by_plain_name, consume_gradient, forget_gradients, normalize_name
from .init_math import check_rank, lora_ga_factors, offset_weight
from .layout import _kind, factor_params, from_matrix, loraga_init, subtract_adapter, to_matrix
from .provenance import fingerprint
from .sketch import LowRankGradient

# LoraGAConfig.dtype -> (precision of the SVD and init math, dtype A and B are stored in; None: the adapter's own)
_DTYPES = {"fp32": (torch.float32, None), "fp64": (torch.float64, None), "bf16": (torch.float32, torch.bfloat16),
           "fp16": (torch.float32, torch.float16)}


def _float_weight(base: nn.Module) -> torch.Tensor:
    return quant.dequantize(base) if quant.is_quantized(base) else base.weight.data


def stored_dtype(param: torch.Tensor, options: LoraGAInitOptions) -> torch.dtype:
    """The dtype A and B are stored in: `options.dtype`'s half dtype, else the adapter parameter's own."""
    return _DTYPES[options.dtype][1] or param.dtype


def check_factors(layer: LoraLayer, adapter_name: str, grad_shape: tuple, options: LoraGAInitOptions,
                  name: str = "this layer") -> None:
    """What `compute_factors` would refuse, from shapes only (the distributed init runs it on every rank before any
    communication): the gradient's shape, `2r <= min(m, n)`, and a dtype change of FSDP2-sharded factors."""
    base, kind = layer.get_base_layer(), _kind(layer)
    shape = tuple(_float_weight(base).shape) if quant.is_quantized(base) else tuple(base.weight.shape)
    if tuple(grad_shape) != shape:
        raise ValueError(f"The gradient for {name!r} has shape {tuple(grad_shape)}, its weight {shape}.")
    rows, cols = shape[0], math.prod(shape[1:])
    check_rank(layer.r[adapter_name], *((cols, rows) if kind in ("conv1d", "embedding") else (rows, cols)),
               name=repr(name))
    sharded = [p for p in factor_params(layer, adapter_name)
               if distributed.is_dtensor(p) and p.dtype != stored_dtype(p, options)]
    if sharded:
        raise ValueError(f"LoRA-GA dtype={options.dtype!r} would change the dtype of {name!r}'s factors, which "
                         f"FSDP2 has sharded in {sharded[0].dtype}: cast the adapter before fully_shard, or use "
                         "dtype='fp32'.")


def compute_factors(layer: LoraLayer, adapter_name: str, grad: torch.Tensor, options: LoraGAInitOptions,
                    name: str = "this layer", weight: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of `adapter_name` for `layer` from the SVD of `grad` (full, shaped like the stored weight), exactly as
    they will be stored (the parameters' shapes, `stored_dtype`); the layer is not touched. `weight`: the full base
    weight (stored layout) where the layer holds a shard of it; only scale="weightS" reads it."""
    base, kind = layer.get_base_layer(), _kind(layer)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    compute, _ = _DTYPES[options.dtype]
    device = distributed.local(base.weight).device
    G = factors = None
    if isinstance(grad, LowRankGradient):  # estimate_gradient(low_rank=k): G's SVD is already known
        factors = tuple(t.to(device) for t in grad.matrix_factors(kind))
    else:
        G = to_matrix(grad.to(device=device), kind)  # (m, n)
    W = None
    if options.scale == "weightS":
        W = to_matrix((_float_weight(base) if weight is None else weight).to(device), kind)  # (m, n)
    A, B = lora_ga_factors(G, r, scaling, options.direction, options.scale, options.stable_gamma, weight=W,
                           compute_dtype=compute, svd_factors=factors)  # (r, n), (m, r)
    param_A, param_B = factor_params(layer, adapter_name)
    return (A.reshape(param_A.shape).to(stored_dtype(param_A, options)),  # rounded to the stored dtype here ...
            B.reshape(param_B.shape).to(stored_dtype(param_B, options)))


def write_factors(layer: LoraLayer, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Copy A, B (stored shapes and dtypes, as `compute_factors` gives them) into the adapter's parameters: the same
    Parameter objects, a new dtype in place of their data if it differs; into this rank's shard under FSDP2."""
    with torch.no_grad():
        for param, value in zip(factor_params(layer, adapter_name), (A, B)):
            if distributed.is_dtensor(param):
                distributed.copy_into(param, value.to(param.device))
                continue
            if param.dtype != value.dtype:  # the parameter (and any reference to it) stays the same
                param.data = param.data.to(value.dtype)
            param.copy_(value)


def set_factors(layer: LoraLayer, adapter_name: str, grad: torch.Tensor, options: LoraGAInitOptions,
                name: str = "this layer") -> None:
    """A, B of `adapter_name` on `layer` from the SVD of `grad` (shaped like the stored weight); base untouched."""
    check_factors(layer, adapter_name, tuple(grad.shape), options, name)
    write_factors(layer, adapter_name, *compute_factors(layer, adapter_name, grad, options, name))


def offset_base(layer: LoraLayer, adapter_name: str,
                factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """`W <- W - s B A` on `layer`'s base, from A and B of `adapter_name` as stored (or `factors`, stored layout and
    dtype) in fp32, rounded once."""
    if isinstance(layer, ParamWrapper):  # LoRA on a bare parameter: every expert's own offset
        return subtract_adapter(layer, adapter_name)
    base, kind = layer.get_base_layer(), _kind(layer)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    param_A, param_B = factor_params(layer, adapter_name) if factors is None else factors
    with torch.no_grad():
        device = distributed.local(base.weight).device
        param_A, param_B = (distributed.full(p).to(device) for p in (param_A, param_B))
        stored_A, stored_B = param_A.reshape(r, -1), param_B.reshape(-1, r)  # (r, n), (m, r) as stored
        if distributed.is_dtensor(base.weight):
            distributed.offset_shard(base.weight, kind, stored_A, stored_B, scaling)
        elif quant.is_quantized(base):
            delta = scaling * (stored_B.float() @ stored_A.float())  # (m, n) == (out, in) for bnb Linear
            quant.requantize_residual(base, delta)
        else:
            W = to_matrix(base.weight.data, kind)  # (m, n)
            new_W = offset_weight(W, stored_A, stored_B, scaling)  # (m, n), rounded once to W's dtype
            base.weight.data = from_matrix(new_W, kind, base.weight)


def _check_own_weight(model: nn.Module, layer: LoraLayer, key: str) -> None:
    """The offset rewrites the base weight in place: refuse a weight tied to another module (e.g. GPT-2's lm_head
    and wte), whose output the offset would change too."""
    if isinstance(layer, ParamWrapper):  # a bare parameter (fused experts): not a tied embedding
        return
    weight = layer.get_base_layer().weight
    owners = {normalize_name(n.rpartition(".")[0]) for n, p in model.named_parameters(remove_duplicate=False)
              if p is weight}
    others = sorted(owners - {normalize_name(key)})
    if others:
        raise ValueError(f"LoRA-GA offsets the base weight of {key!r}, but that weight is tied to {others}: the offset "
                         "would change them too. Untie the weights (e.g. tie_word_embeddings=False) or leave "
                         f"{key!r} out of target_modules.")


def init_record(tuner) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """adapter name -> module key -> (A0, B0): the factors a `LoraGAModel`'s adapters were initialised with (CPU
    copies, stored layout and dtype), i.e. what its base weights were offset by. Saving needs them: the trained
    adapter equals `s (B A - B0 A0)` on the original weights. Adapters never initialised (loaded, or built with no
    gradients waiting) have no entry."""
    return tuner.__dict__.setdefault("_loraga_init", {})


def init_fingerprints(tuner) -> dict[str, dict[str, str]]:
    """adapter name -> on-disk key of A0 or B0 -> its fingerprint (`provenance.fingerprint`), for every adapter the
    tuner initialised with LoRA-GA (`LoraGAModel` and `LoraModel(init_lora_weights="lora_ga")`): what the saves
    check an init folder against (`provenance.check_initial_factors`)."""
    return tuner.__dict__.setdefault("_loraga_init_fingerprints", {})


def _remember_init(tuner, layer: LoraLayer, adapter_name: str, key: str,
                   factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """Record `factors` (default: the layer's A, B as stored now) as the init of `adapter_name` at `key`: their
    fingerprints always, CPU copies on a `LoraGAModel` (LoraModel(init_lora_weights="lora_ga") saves as upstream)."""
    factors = factor_params(layer, adapter_name) if factors is None else factors
    if isinstance(layer, ParamWrapper):  # keyed like its file keys: the (possibly nested) wrapper's module path
        key = module_path(tuner.model, layer) or key
    init_fingerprints(tuner).setdefault(adapter_name, {}).update(
        {file_key: fingerprint(t) for file_key, t in zip(_file_keys(key, layer), factors)})
    if isinstance(tuner, LoraGAModel):
        init_record(tuner).setdefault(adapter_name, {})[key] = tuple(t.detach().to("cpu", copy=True)
                                                                     for t in factors)


def _forget_init(tuner, adapter_name: str) -> None:
    init_record(tuner).pop(adapter_name, None)
    init_fingerprints(tuner).pop(adapter_name, None)


def adapter_layers(tuner, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """(module key, layer) for every LoRA layer of `tuner` carrying `adapter_name`."""
    return [(k, m) for k, m in tuner.tuner_layers() if isinstance(m, LoraLayer) and layer_factors(m, adapter_name)]


@contextlib.contextmanager
def offsets_after_injection(tuner) -> Iterator[None]:
    """Inside: LoRA-GA layers get their A and B, and their base weights are offset only once the whole injection
    has succeeded, so a failed `get_peft_model` / `add_adapter` (missing gradient, rank too large, ...) leaves the
    base weights as they were. The `preprocess_loraga` gradients are dropped after the offsets."""
    pending: list[tuple[LoraLayer, str, str]] = []
    deferred: list[tuple[str, LoraLayer, str, LoraGAInitOptions]] = []  # A, B from the collective init, at the end
    tuner.__dict__["_loraga_pending"], tuner.__dict__["_loraga_deferred"] = pending, deferred
    try:
        yield
    finally:
        tuner.__dict__.pop("_loraga_pending", None)
        tuner.__dict__.pop("_loraga_deferred", None)
    factors = {}
    if deferred:  # one injection: one adapter name, one config
        factors = distributed.init_factors([(key, layer) for key, layer, _, _ in deferred], deferred[0][2],
                                           active_gradients(tuner.model), deferred[0][3])
    for adapter_name in {adapter_name for _, adapter_name, _ in pending}:  # a new init of that name starts afresh
        _forget_init(tuner, adapter_name)
    for layer, adapter_name, key in pending:
        offset_base(layer, adapter_name, factors=factors.get(key))
        _remember_init(tuner, layer, adapter_name, key, factors=factors.get(key))
    if pending:  # estimated on the base before its offset: leftovers must not initialise a later adapter
        forget_gradients(tuner.model)


def init_from_gradients(tuner, layer: LoraLayer, config, adapter_name: str, key: str) -> None:
    """Shared by `LoraGAModel` and `LoraModel(init_lora_weights="lora_ga")`: look up the gradient of module `key`
    for `tuner.model` and initialise (the base offset waits for the end of the injection when inside
    `offsets_after_injection`). Without any waiting gradients the layer keeps LoRA's plain init (a warning says so:
    that is what loading saved weights does)."""
    grads = active_gradients(tuner.model)
    if grads is None:
        if not getattr(tuner, "_warned_no_gradients", False):
            warnings.warn("No LoraGAContext is open for this model (and no preprocess_loraga gradients wait): the "
                          "adapter keeps LoRA's default init and the base weights are not offset. That is right when "
                          "loading saved weights, and before training with LoraGACallback (it initialises at the "
                          "start of training); else, to initialise LoRA-GA, call get_peft_model inside "
                          "LoraGAContext.")
            tuner._warned_no_gradients = True
        if config.init_lora_weights == "lora_ga":  # the layer was built with init False (random B): use the default
            layer.reset_lora_parameters(adapter_name, True)
        return
    name, names = normalize_name(key), distributed.gradient_names(grads)
    if name not in names:
        if upstream.unreached_fallback(tuner.model, layer, adapter_name, name):  # preprocess_loraga, no backward
            return
        raise ValueError(f"No estimated gradient for target module {key!r}; the gradients cover {len(names)} modules "
                         f"(e.g. {names[:5]}). Estimate with the same model and targets (peft_config=...).")
    _check_own_weight(tuner.model, layer, key)
    options = LoraGAInitOptions.from_any(config.lora_ga_config if _is_upstream_spelling(config) else config)
    pending = tuner.__dict__.get("_loraga_pending")
    if isinstance(layer, ParamWrapper):  # one init per expert (peft.tuners.loraga.layout)
        if distributed.is_distributed(grads, [layer.get_param()]):
            raise ValueError(f"LoRA-GA on target parameter {key!r}: sharded or owner-only gradients are not "
                             "supported for target_parameters; estimate with reduce_to='all' on unsharded weights.")
        loraga_init(layer, adapter_name, grads[name], options, key)
    elif distributed.is_distributed(grads, [layer.get_base_layer().weight]):  # the collective init, after injecting
        deferred = tuner.__dict__.get("_loraga_deferred")
        if pending is not None and deferred is not None:
            pending.append((layer, adapter_name, key))
            deferred.append((key, layer, adapter_name, options))
            return
        factors = distributed.init_factors([(key, layer)], adapter_name, grads, options)[key]
        offset_base(layer, adapter_name, factors=factors)
        _remember_init(tuner, layer, adapter_name, key, factors=factors)
        return
    else:
        set_factors(layer, adapter_name, grads[name], options, name=key)
    if pending is not None:
        pending.append((layer, adapter_name, key))
    else:
        offset_base(layer, adapter_name)
        _remember_init(tuner, layer, adapter_name, key)
        consume_gradient(tuner.model, key)


def _is_upstream_spelling(config) -> bool:
    return getattr(config, "init_lora_weights", None) == "lora_ga" and not hasattr(config, "direction")


class LoraGAModel(LoraModel):
    """LoRA model whose new adapters are initialised by LoRA-GA (gradients from the open `LoraGAContext`, or later
    by `initialise_adapter`, what `LoraGACallback` calls at the start of training).

    An initialised adapter only fits the offset base `W - s B0 A0`, so it is saved (`PeftModel.save_pretrained`,
    hence every Trainer checkpoint) as the plain rank-2r LoRA that fits the ORIGINAL base (`adapter_to_save`), and
    loading such a folder back into a fresh adapter of the same config restores the rank-r adapter on the offset
    base (`adapter_from_saved`, what Trainer's `resume_from_checkpoint` runs)."""

    prefix: str = "lora_"

    def inject_adapter(self, model: nn.Module, adapter_name: str) -> None:
        _forget_init(self, adapter_name)  # a new adapter of that name starts without an init
        with offsets_after_injection(self):
            super().inject_adapter(model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        _forget_init(self, adapter_name)

    def _init_adapter_weights(self, layer: LoraLayer, config, adapter_name: str, key: str) -> None:
        init_from_gradients(self, layer, config, adapter_name, key)

    def adapter_layers(self, adapter_name: str) -> list[tuple[str, LoraLayer]]:
        """(module key, layer) for every layer carrying `adapter_name`."""
        return adapter_layers(self, adapter_name)

    def initialise_adapter(self, adapter_name: str, named_grad: dict[str, torch.Tensor]) -> None:
        """LoRA-GA init of an existing adapter that has not been initialised yet (built with no gradients waiting):
        A and B from `named_grad` (as `estimate_gradient` returns), copied into the same Parameter objects (an
        optimizer that already holds them sees the init), then every base weight offset. All-or-nothing: on an error
        A, B and the base weights are as they were. On an FSDP2-sharded model (DTensor gradients from
        `estimate_gradient` on it) or with owner-only gradients, a collective: every process calls it (each SVD runs on
        one of them; docs/loraga.md, "Large models: several GPUs")."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; available adapters: {sorted(self.peft_config)}.")
        if adapter_name in init_record(self):
            raise ValueError(f"Adapter {adapter_name!r} is already LoRA-GA initialised (its base weights are offset);"
                             " initialising again would offset them twice.")
        options = LoraGAInitOptions.from_any(self.peft_config[adapter_name])
        grads = by_plain_name(named_grad)
        distributed.reshard(self.model)  # FSDP2: write the sharded parameters (a forward leaves the root unsharded)
        layers, names = self.adapter_layers(adapter_name), distributed.gradient_names(grads)
        for key, layer in layers:
            if normalize_name(key) not in names:
                raise ValueError(f"No estimated gradient for target module {key!r}; the gradients cover "
                                 f"{len(names)} modules (e.g. {names[:5]}).")
            _check_own_weight(self.model, layer, key)
        factors = {}
        # owner-only or sharded gradients, or a sharded model: each SVD on one rank, A and B broadcast
        if distributed.is_distributed(grads, [layer.get_base_layer().weight for _, layer in layers]):
            factors = distributed.init_factors(layers, adapter_name, grads, options)
        else:
            saved = [(p, p.data.clone()) for _, layer in layers for p in factor_params(layer, adapter_name)]
            try:
                for key, layer in layers:
                    set_factors(layer, adapter_name, grads[normalize_name(key)], options, name=key)
            except Exception:
                for param, data in saved:
                    param.data = data
                raise
        for key, layer in layers:
            offset_base(layer, adapter_name, factors=factors.get(key))
            _remember_init(self, layer, adapter_name, key, factors=factors.get(key))
        forget_gradients(self.model)  # preprocess_loraga leftovers predate the offset

    def adapter_to_save(self, adapter_name: str, weights: dict, config) -> tuple[dict, object]:
        """The on-disk form of adapter `adapter_name` (`weights` in on-disk keys, as `get_peft_model_state_dict`
        gives them): an initialised adapter becomes the plain rank-2r LoRA `([A; A0], [B, -B0])` with its config
        (`saving.final_form`); any other is saved as it is (it fits the original base already)."""
        from .saving import final_form

        init_state = self.init_state_dict(adapter_name)
        return (weights, config) if init_state is None else final_form(weights, init_state, config)

    def adapter_from_saved(self, adapter_name: str, weights: dict, config):
        """Undo `adapter_to_save` when loading into the existing adapter `adapter_name`: returns the weights to
        load and a function to call once they are loaded (None when there is nothing to undo).

        A plain LoRA folder of rank 2r (per layer) with this adapter's scale is split into the trained
        `A = A'[:r]`, `B = B'[:, :r]` (returned) and the initial `A0 = A'[r:]`, `B0 = -B'[:, r:]`. The function then
        offsets the base weights by `-s B0 A0` (in fp32 from A0, B0 as stored, rounded once: bit for bit the offset of
        the original run) and records the init. Into an adapter that is initialised already, the folder's A0, B0 must
        be the ones its base was offset with (e.g. a checkpoint of the same run); else a ValueError."""
        from .saving import split_final_state_dict

        layers = dict(self.adapter_layers(adapter_name))
        split = split_final_state_dict(weights, {key: (*_file_keys(key, layer), layer.r[adapter_name],
                                                       layer.scaling[adapter_name]) for key, layer in layers.items()},
                                       config)
        if split is None:
            return weights, None
        weights, init = split
        for key, layer in layers.items():
            _check_own_weight(self.model, layer, key)
        record = init_record(self).get(adapter_name)
        if record is not None:
            _check_same_init(adapter_name, record, init)
            return weights, None

        def commit() -> None:
            for key, layer in layers.items():
                offset_base(layer, adapter_name, factors=init[key])
                _remember_init(self, layer, adapter_name, key, factors=init[key])
            forget_gradients(self.model)  # preprocess_loraga leftovers predate the offset

        return weights, commit

    def init_state_dict(self, adapter_name: str) -> Optional[dict[str, torch.Tensor]]:
        """The recorded A0, B0 of `adapter_name` under their on-disk keys (None: not LoRA-GA initialised)."""
        record = init_record(self).get(adapter_name)
        if record is None:
            return None
        layers = dict(self.adapter_layers(adapter_name))
        state = {}
        for key, (A0, B0) in record.items():
            key_A, key_B = _file_keys(key, layers[key])
            state[key_A], state[key_B] = A0, B0
        return state


_FILE_PREFIX = "base_model.model."  # PeftModel.base_model (this tuner) .model (the wrapped model)


def _file_keys(key: str, layer: LoraLayer) -> tuple[str, str]:
    """On-disk keys of the A and B factors of the layer at module key `key` (the adapter name is not in them)."""
    if _kind(layer) == "embedding":
        return f"{_FILE_PREFIX}{key}.lora_embedding_A", f"{_FILE_PREFIX}{key}.lora_embedding_B"
    return f"{_FILE_PREFIX}{key}.lora_A.weight", f"{_FILE_PREFIX}{key}.lora_B.weight"


def _check_same_init(adapter_name: str, record: dict, init: dict) -> None:
    for key, (A0, B0) in record.items():
        A1, B1 = init[key]
        if not (torch.equal(A0, A1.to(A0)) and torch.equal(B0, B1.to(B0))):
            raise ValueError(
                f"Adapter {adapter_name!r} is LoRA-GA initialised already, and the folder's initial factors for "
                f"{key!r} are not the ones its base weights were offset with (another run?). Load it into a fresh "
                "model: get_peft_model(base, config) outside LoraGAContext, then load_adapter (or Trainer's "
                "resume_from_checkpoint).")


def layer_factors(layer: LoraLayer, adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of `adapter_name` on `layer` as stored, or None when the layer does not carry it."""
    if adapter_name not in layer.lora_A and adapter_name not in layer.lora_embedding_A:
        return None
    return factor_params(layer, adapter_name)
