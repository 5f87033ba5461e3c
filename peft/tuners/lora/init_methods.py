"""LoRA initialisations that read (and some rewrite) the base weight: upstream's `init_lora_weights` strings.

Notation: W is the (m, n) = (out, in) base weight, s the adapter's scale, A (r, n), B (m, r).

- "pissa" (Meng et al. 2024): W = U S V^T; `A = sqrt(S_r / s) V_r^T`, `B = U_r sqrt(S_r / s)`, so `s B A` is the best
  rank-r part of W; the base keeps the residual `W - s B A`. "pissa_niter_<k>": the same from a randomized SVD
  (`torch.svd_lowrank` with k subspace iterations), an approximation of the top-r triplets.
- "olora" (Büyükakyüz 2024): W = Q R (thin QR); `B = Q[:, :r]`, `A = R[:r]`; the base keeps `W - s B A`.
- "orthogonal": A and B from the odd / even rows of a random r x r orthogonal matrix, so `B A = 0` exactly while
  both factors are non-zero (r must be even); the base is not touched.

All three leave the model output unchanged at init: `(W - s B A) + s B A = W`, up to one rounding of the base to its
dtype. "corda" and "eva" need data: "corda" reads the `eigens` that `preprocess_corda` attached to the base layer
(`peft.tuners.lora.corda`); "eva" zeroes B and leaves A to `initialize_lora_eva_weights` (`peft.tuners.lora.eva`).

- "loftq" (Li et al. 2023), with `loftq_config={"loftq_bits": 4 or 8, "loftq_iter": T}`: alternate T times
  `Q = deq(quant(W - B A))`, `B A = best rank-r approximation of W - Q`; the base becomes the float `Q` and
  `A = sqrt(S_r) V_r^T`, `B = U_r sqrt(S_r)` (as upstream: not divided by s, so `Q + B A ~ W` holds for s = 1).
  nf4 / int8 through bitsandbytes (CPU or GPU). Applied by `LoraModel`, which holds the config.

A base rewritten by PiSSA / OLoRA only fits that adapter: save with
`save_pretrained(..., path_initial_model_for_weight_conversion=<folder saved right after init>)` to get the plain
rank-2r LoRA for the original base (`peft.tuners.loraga.conversion`, shared with LoRA-GA).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ...utils.config_validation import Refused, Rule

BASE_CHANGING = ("pissa", "olora", "corda")  # inits that rewrite W (warned about next to other adapters)
# (eva_config / corda_config: see `check_data_driven_options`)
DATA_DRIVEN = ("corda", "eva")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
_NAMES = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA"}


def is_pissa(value) -> bool:
    return isinstance(value, str) and (value == "pissa" or _PISSA_NITER.fullmatch(value) is not None)


def is_weight_init(value) -> bool:
    """Whether `init_lora_weights=value` is handled here (reads the base weight, or is refused as unimplemented)."""
    if not isinstance(value, str):
        return False
    return is_pissa(value) or value.lower() == "olora" or value in ("orthogonal", "loftq") + DATA_DRIVEN


def init_weights_rule(plain: tuple) -> Rule:
    """Config rule: one of `plain` (compared by type), or one of the strings handled here."""
    expected = f"one of {plain + ('pissa', 'pissa_niter_<int>', 'olora', 'orthogonal', 'loftq') + DATA_DRIVEN}"

    def convert(value):
        if any(isinstance(value, type(p)) and value == p for p in plain) or is_weight_init(value):
            return value
        raise Refused()

    return Rule(expected, convert)


# --- pure math ----------------------------------------------------------------------------------------------------
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None):
    """(A (r, n), B (m, r)) with `s B A` the top-r SVD part of `weight` (m, n); randomized with `niter` iterations."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scaling)  # (r,)
    return root[:, None] * Vh, U * root[None, :]


def olora_factors(weight: torch.Tensor, r: int):
    """(A = R[:r] (r, n), B = Q[:, :r] (m, r)) from the thin QR of `weight` (m, n)."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int, dtype=torch.float32):
    """Random A (r, n), B (m, r), both non-zero, with `B A = 0`: A's rows lie in the span of the odd rows of a random
    orthogonal Q (r x r), B's columns pair with its even rows, and those rows are orthogonal."""
    if r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = (torch.randn(in_features, r // 2) @ Q[0::2]).T / 10.0  # (r, n)
    B = torch.randn(r // 2, out_features).T @ Q[1::2] / 10.0  # (m, r)
    return A.contiguous().to(dtype), B.contiguous().to(dtype)


def residual_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`W - s B A` computed in at least fp32 (weight (m, n))."""
    work = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(work) - scaling * (B.to(work) @ A.to(work))


# --- layer hook ---------------------------------------------------------------------------------------------------
def _read_weight(layer) -> tuple[torch.Tensor, bool]:
    """The base weight as float (m, n) and whether it is a bitsandbytes weight."""
    from ...utils.quantization import dequantize_bnb_layer, is_bnb_quantized_param

    base = layer.get_base_layer()
    if is_bnb_quantized_param(base.weight):
        return dequantize_bnb_layer(base), True
    weight = base.weight.detach()
    if not weight.dtype.is_floating_point:
        raise TypeError(f"Initialise the LoRA factors from a float base weight; got {weight.dtype}. Quantize the "
                        "residual model afterwards.")
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return (weight.T if layer.fan_in_fan_out else weight), False


def _write_weight(layer, weight: torch.Tensor, quantized: bool) -> None:
    from ...utils.quantization import replace_bnb_weight

    base = layer.get_base_layer()
    if quantized:
        replace_bnb_weight(base, weight)
    else:
        new = weight.T if layer.fan_in_fan_out else weight
        base.weight.data = new.to(base.weight.dtype).contiguous()


def _set_factors(layer, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    weight_A, weight_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    weight_A.data = A.to(device=weight_A.device, dtype=weight_A.dtype).contiguous()
    weight_B.data = B.to(device=weight_B.device, dtype=weight_B.dtype).contiguous()


def initialise_from_weight(layer, adapter_name: str, init: str) -> None:
    """Apply `init` (a string `is_weight_init` accepts) to `layer`'s adapter `adapter_name`."""
    if init == "eva":  # A comes from initialize_lora_eva_weights (peft.tuners.lora.eva); B zero until then
        torch.nn.init.zeros_(layer.lora_B[adapter_name].weight)
        return
    if init == "loftq":
        raise ValueError("init_lora_weights='loftq' is applied by LoraModel from LoraConfig.loftq_config; a layer "
                         "alone cannot apply it.")
    if adapter_name not in layer.lora_A or layer.get_base_layer().weight.dim() != 2:
        raise ValueError(f"init_lora_weights={init!r} is supported for Linear / Conv1D layers only, not "
                         f"{type(layer.get_base_layer()).__name__}.")
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if layer.lora_A[adapter_name].weight.device.type == "meta":
        return  # created empty, the weights come from a checkpoint
    if init == "orthogonal":
        A, B = orthogonal_factors(layer.in_features, layer.out_features, r, layer.get_base_layer().weight.dtype)
        _set_factors(layer, adapter_name, A, B)
        return
    if init == "corda":
        from .corda import corda_init_layer

        return corda_init_layer(layer, adapter_name)
    weight, quantized = _read_weight(layer)
    if init.lower() == "olora":  # upstream accepts any case here ("OLoRA")
        A, B = olora_factors(weight, r)
    else:
        match = _PISSA_NITER.fullmatch(init)
        A, B = pissa_factors(weight, r, scaling, niter=int(match.group(1)) if match else None)
    _set_factors(layer, adapter_name, A, B)
    A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight  # as stored
    _write_weight(layer, residual_weight(weight, A.detach(), B.detach(), scaling), quantized)


def warn_if_base_changing(configs) -> None:
    """Upstream's warning when an adapter that rewrites the base weights sits next to other adapters."""
    configs = list(configs)
    if len(configs) < 2:
        return
    inits = [getattr(c, "init_lora_weights", None) for c in configs]
    for key in BASE_CHANGING:
        if any((is_pissa(i) if key == "pissa" else i == key) for i in inits):
            warnings.warn(f"{_NAMES[key]} changes the base weights of the model and should thus not be used with "
                          f"other adapters. Convert the {_NAMES[key]} adapter into a plain LoRA adapter with "
                          "save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter folder>).")
            return


# --- LoftQ --------------------------------------------------------------------------------------------------------
@dataclass
class LoftQConfig:
    """Upstream's LoftQ sub-config: `loftq_bits` (4: nf4, 8: int8) and `loftq_iter` (alternations, >= 1)."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ (4 or 8)."})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ."})


def loftq_options(value) -> dict:
    """`loftq_config` as a plain dict (a LoftQConfig or a dict); refuses unknown keys and bad values."""
    data = dict(vars(value)) if isinstance(value, LoftQConfig) else value
    if not isinstance(data, dict) or set(data) - {"loftq_bits", "loftq_iter"}:
        raise Refused("a dict or LoftQConfig with keys loftq_bits, loftq_iter")
    bits, iters = data.get("loftq_bits", 4), data.get("loftq_iter", 1)
    if bits not in (4, 8) or isinstance(bits, bool):
        raise Refused(f"loftq_bits must be 4 or 8, got {bits!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise Refused(f"loftq_iter must be an int >= 1, got {iters!r}")
    return dict(data)


LOFTQ_RULE = Rule("a dict or LoftQConfig with loftq_bits in (4, 8) and loftq_iter >= 1", loftq_options)


def top_r_factors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = sqrt(S_r) V_r^T (r, n), B = U_r sqrt(S_r) (m, r)): the best rank-r approximation of `matrix`, balanced."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


def loftq_factors(weight: torch.Tensor, r: int, num_iter: int, quantize: Callable[[torch.Tensor], torch.Tensor]):
    """LoftQ's alternation: returns (Q (m, n), A (r, n), B (m, r)) with `Q = quantize(W - B A)` (dequantized) and
    `B A` the best rank-r approximation of `W - Q`, after `num_iter` rounds (the first quantizes W itself)."""
    if num_iter < 1:
        raise ValueError(f"Invalid loftq_iter={num_iter}: expected an int >= 1.")
    target = weight
    for _ in range(num_iter):
        Q = quantize(target)
        A, B = top_r_factors(weight - Q, r)
        target = weight - B @ A
    return Q, A, B


def bnb_quantizer(bits: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`W -> deq(quant(W))` with bitsandbytes nf4 (blocks of 64, no double quantization) or row-wise int8."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError("init_lora_weights='loftq' quantizes with bitsandbytes, which is not installed.") from exc

    def quantize(matrix: torch.Tensor) -> torch.Tensor:
        data = matrix.detach().to("cpu", torch.float32).contiguous()
        if bits == 4:
            q = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=False, quant_type="nf4").to(device)
            return bnb.functional.dequantize_4bit(q.data, q.quant_state).to(torch.float32)
        q = bnb.nn.Int8Params(data, requires_grad=False).to(device)
        return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).to(torch.float32)

    return quantize


def loftq_layer(layer, adapter_name: str, options: dict) -> None:
    """Apply LoftQ to a float Linear / Conv1D LoRA layer: the base becomes the dequantized weight."""
    options = loftq_options(options or {})
    if adapter_name not in layer.lora_A or layer.get_base_layer().weight.dim() != 2:
        raise ValueError("init_lora_weights='loftq' is supported for Linear / Conv1D layers only, not "
                         f"{type(layer.get_base_layer()).__name__}.")
    weight, quantized = _read_weight(layer)
    if quantized:
        raise ValueError("init_lora_weights='loftq' needs the float base model (LoftQ quantizes it itself); load the "
                         "model without a bitsandbytes quantization_config.")
    device = weight.device if weight.device.type != "meta" else torch.device("cpu")
    compute = weight.to(torch.float32)
    Q, A, B = loftq_factors(compute, layer.r[adapter_name], options.get("loftq_iter", 1),
                            bnb_quantizer(options.get("loftq_bits", 4), device))
    _set_factors(layer, adapter_name, A, B)
    _write_weight(layer, Q.to(weight.device), quantized=False)


# --- EVA / CorDA sub-configs --------------------------------------------------------------------------------------
def sub_config_rule(name: str, cls) -> Rule:
    """`None`, a `cls` instance, or a dict of its fields (as read back from adapter_config.json)."""

    def convert(value):
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except (TypeError, ValueError) as exc:
                raise Refused(str(exc).rstrip(".")) from None
        raise Refused()

    return Rule(f"None, a {cls.__name__} or a dict of its fields", convert)


def check_data_driven_options(config) -> None:
    """Upstream's warnings: 'eva' / 'corda' without their sub-config get the default one; a sub-config without its
    init is ignored."""
    pairs = (("eva", "eva_config", "eva.EvaConfig"), ("corda", "corda_config", "corda.CordaConfig"))
    for init, attr, cls_path in pairs:
        value = getattr(config, attr, None)
        if config.init_lora_weights == init and value is None:
            warnings.warn(f"`init_lora_weights` is '{init}' but `{attr}` is not specified. Using default "
                          f"{'EVA' if init == 'eva' else 'CorDA'} config.")
            module, name = cls_path.split(".")
            import importlib

            setattr(config, attr, getattr(importlib.import_module(f".{module}", __package__), name)())
        elif config.init_lora_weights != init and value is not None:
            warnings.warn(f"`{attr}` specified but will be ignored when `init_lora_weights` is not '{init}'.")
    init = config.init_lora_weights
    base_changing = isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda"))
    if base_changing and config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        warnings.warn(
            "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
            f"base weights ({init}) cannot be done exactly: save_pretrained(path_initial_model_for_weight_conversion"
            "=...) will refuse this adapter (saving it as it is works)."
        )
