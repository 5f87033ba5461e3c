"""Dequantize and requantize bitsandbytes weights (4-bit `Linear4bit`, 8-bit `Linear8bitLt`).

Pure helpers shared by the bitsandbytes LoRA layers (merge / unmerge) and by LoRA-GA (offsetting a quantized base
by `W <- W - s B A`). The round trip every caller uses:

    settings = bnb_quant_settings(layer)                 # what must survive
    W = dequantize_bnb_layer(layer)                      # (out, in) fp32: the weight the layer computes with
    replace_bnb_weight(layer, W + s * B @ A)             # requantized with the layer's OWN settings
    assert bnb_quant_settings(layer) == settings

4-bit: `W = code[q] * absmax` per block of `blocksize` values (`code` is the nf4 or fp4 table; with double quant
`absmax` is itself 8-bit quantized). Requantizing keeps the quant type, blocksize, double quant
(`compress_statistics`), quant storage, the dtype the weight was quantized from, and the layer's compute dtype
(the layer object is kept, only its weight parameter is replaced).

8-bit (LLM.int8): `W = CB * SCB[:, None] / 127` (int8 codes `CB`, per-row absmax `SCB`). Requantizing keeps the
outlier `threshold` and `has_fp16_weights` (both live on the layer's `state`, which is kept).

CPU packing trap: on CPUs with AVX512-BF16, a `Linear4bit` forward in eval mode without grad repacks its weight
in place into a CPU-only layout (`quant_state.packing_format_for_cpu`: codes re-tiled, `absmax` un-nested and
rounded to bf16). bitsandbytes undoes it (`_convert_weight_packed_for_cpu_inverse`) before saving; here it is
undone on a copy, so dequantizing never changes the layer, and the result is exactly the weight the packed kernel
multiplies with (the bf16 `absmax`, not a re-quantized one). The packed kernel has no backward, so before a
forward that needs gradients the LoRA layer restores the canonical layout in place (`unpack_bnb_4bit_for_training`).

bitsandbytes is imported lazily, only once a bitsandbytes layer is met (so it is in `sys.modules`).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

_PARAM_4BIT, _PARAM_8BIT = "Params4bit", "Int8Params"


@dataclass(frozen=True)
class BnbQuantSettings:
    """Everything a requantized bitsandbytes weight must keep. Unused fields are None (8-bit has no blocksize).

    `weight_dtype` is the float dtype the 4-bit weight was quantized from (what dequantizing returns natively).
    """

    bits: int
    quant_type: Optional[str] = None
    compute_dtype: Optional[torch.dtype] = None
    blocksize: Optional[int] = None
    compress_statistics: Optional[bool] = None
    quant_storage: Optional[torch.dtype] = None
    weight_dtype: Optional[torch.dtype] = None
    threshold: Optional[float] = None
    has_fp16_weights: Optional[bool] = None

    def as_dict(self) -> dict:
        return asdict(self)


def _bnb():
    """The already imported bitsandbytes module (callers only get here holding a bitsandbytes object)."""
    module = sys.modules.get("bitsandbytes")
    if module is None:
        import bitsandbytes as module  # noqa: PLC0415 - optional dependency, imported on first use
    return module


def is_bnb_4bit_layer(module: nn.Module) -> bool:
    """True for `bitsandbytes.nn.Linear4bit` (and subclasses such as LinearNF4), without importing bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_8bit_layer(module: nn.Module) -> bool:
    """True for `bitsandbytes.nn.Linear8bitLt`, without importing bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_bnb_quantized_param(param: Optional[torch.Tensor]) -> bool:
    """True for a bitsandbytes quantized parameter (`Params4bit`, `Int8Params`), checked by class name."""
    return param is not None and type(param).__name__ in (_PARAM_4BIT, _PARAM_8BIT)


def _is_packed_for_cpu(quant_state) -> bool:
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _check_layer(module: nn.Module) -> int:
    if is_bnb_4bit_layer(module):
        return 4
    if is_bnb_8bit_layer(module):
        return 8
    raise ValueError(
        f"Expected a bitsandbytes Linear4bit or Linear8bitLt layer, got {type(module).__module__}."
        f"{type(module).__name__}."
    )


def bnb_quant_settings(module: nn.Module) -> BnbQuantSettings:
    """The quantization settings of a bitsandbytes `Linear4bit` / `Linear8bitLt` layer (see `BnbQuantSettings`)."""
    if _check_layer(module) == 8:
        state = module.state
        return BnbQuantSettings(bits=8, threshold=float(state.threshold), has_fp16_weights=bool(state.has_fp16_weights))
    weight = module.weight
    state = weight.quant_state
    packed = _is_packed_for_cpu(state)
    return BnbQuantSettings(
        bits=4,
        quant_type=state.quant_type if state is not None else weight.quant_type,
        compute_dtype=module.compute_dtype,
        blocksize=state.blocksize if state is not None else weight.blocksize,
        compress_statistics=bool(state.original_nested if packed else state.nested) if state is not None
        else bool(weight.compress_statistics),
        quant_storage=weight.quant_storage,
        weight_dtype=(state.original_dtype if packed else state.dtype) if state is not None else None,
    )


def _unpacked_4bit(data: torch.Tensor, quant_state):
    """(codes, quant_state) in bitsandbytes' canonical layout, undoing the CPU packing on copies.

    The packed `absmax` (bf16, shape (in/blocksize, out), never nested) is kept as fp32 instead of being
    re-quantized as bitsandbytes' own inverse does, so the result dequantizes to what the packed kernel uses.
    """
    if not _is_packed_for_cpu(quant_state):
        return data, quant_state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # noqa: PLC0415

    packed_absmax = quant_state.absmax  # (in/blocksize, out) bf16
    work = copy.copy(quant_state)  # the inverse reassigns fields of the state it is given: never the layer's
    work.original_nested = False
    codes, work = _convert_weight_packed_for_cpu_inverse(data, work)
    work.absmax = packed_absmax.T.reshape(-1).to(torch.float32)
    work.nested, work.state2, work.offset = False, None, None
    return codes, work


def unpack_bnb_4bit_for_training(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU packing of a `Linear4bit` weight in place; True if it was packed.

    The packed weight is multiplied by a kernel without autograd (`gemv_4bit`), so a training forward after an
    eval pass would send no gradient through the layer to its input, silently (and fail when the bias trains).
    Restored: the canonical codes in the storage dtype, `absmax` as the packed kernel used it (fp32; re-nested
    by bitsandbytes' own inverse with double quant, which leaves a non-nested `absmax` transposed in bf16, so it
    is set here), dtype and nesting as before, so bitsandbytes' differentiable path runs again. bitsandbytes
    repacks at the next eval forward without grad.
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or not _is_packed_for_cpu(state):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # noqa: PLC0415

    packed_absmax = state.absmax  # (in/blocksize, out) bf16
    nested = bool(state.original_nested)
    codes, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)  # updates the state in place
    if not nested:
        state.absmax = packed_absmax.T.reshape(-1).to(torch.float32)
    weight.data = codes
    weight.quant_state = module.quant_state = state
    return True


def dequantize_bnb_weight(weight: torch.Tensor, state=None) -> torch.Tensor:
    """fp32 copy of a bitsandbytes weight, shaped (out_features, in_features).

    `Params4bit`: `code[q] * absmax` per block (CPU packing undone on a copy). `Int8Params`:
    `CB * SCB[:, None] / 127`; `SCB` is on the weight before the first forward and on the layer's `state`
    (`MatmulLtState`) after it, so pass `state=layer.state` for 8-bit weights. A float weight (8-bit with
    `has_fp16_weights=True`) is returned as fp32.
    """
    kind = type(weight).__name__
    if kind == _PARAM_4BIT:
        if weight.quant_state is None:
            raise ValueError("This Params4bit weight is not quantized yet (quant_state is None); move it to a device.")
        codes, quant_state = _unpacked_4bit(weight.data, weight.quant_state)
        return _bnb().functional.dequantize_4bit(codes, quant_state).to(torch.float32)
    if weight.dtype.is_floating_point:
        return weight.detach().to(torch.float32)
    if kind == _PARAM_8BIT or weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        if scb is None and state is not None:
            scb = state.SCB
        if scb is None:
            raise ValueError("No SCB (row scales) on this int8 weight or its state; pass state=layer.state.")
        return weight.data.to(torch.float32) * (scb.to(torch.float32).unsqueeze(1) * (1.0 / 127.0))  # as bnb does
    raise ValueError(f"Expected a bitsandbytes Params4bit / Int8Params or a float weight, got {kind} ({weight.dtype}).")


def dequantize_bnb_layer(module: nn.Module) -> torch.Tensor:
    """fp32 (out, in) weight of a bitsandbytes `Linear4bit` / `Linear8bitLt` layer; the layer is not changed."""
    bits = _check_layer(module)
    return dequantize_bnb_weight(module.weight, state=module.state if bits == 8 else None)


def requantize_bnb_weight(module: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new bitsandbytes parameter holding float `weight` (out, in), quantized with `module`'s own settings.

    4-bit: `Params4bit(weight in the original weight dtype, blocksize, compress_statistics, quant_type,
    quant_storage)` quantized on the layer's device (never bitsandbytes' defaults, which would turn nf4 into fp4).
    8-bit: `Int8Params(weight, has_fp16_weights)`: int8 codes and row scales, or kept in float when
    `has_fp16_weights=True`. `module` is not changed; see `replace_bnb_weight`.
    """
    bits = _check_layer(module)
    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"Weight of shape {tuple(weight.shape)} given for a layer expecting {expected} (out, in).")
    old = module.weight
    device = old.device
    bnb = _bnb()
    if bits == 8:
        fp16_weights = bool(module.state.has_fp16_weights)
        dtype = old.dtype if fp16_weights else torch.float16
        data = weight.detach().to("cpu", dtype).contiguous()
        new = bnb.nn.Int8Params(data, requires_grad=old.requires_grad and fp16_weights, has_fp16_weights=fp16_weights)
        return new.to(device)
    settings = bnb_quant_settings(module)
    new = bnb.nn.Params4bit(
        weight.detach().to("cpu", settings.weight_dtype or torch.float32).contiguous(),
        requires_grad=False, blocksize=settings.blocksize, compress_statistics=settings.compress_statistics,
        quant_type=settings.quant_type, quant_storage=settings.quant_storage,
    )
    return new.to(device)  # quantizes


def replace_bnb_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Requantize float `weight` into `module` in place of its current weight (see `requantize_bnb_weight`).

    The layer object (compute dtype, 8-bit `state` with threshold and has_fp16_weights) is kept; stale cached
    int8 matrices on the state are dropped so the next forward uses the new weight.
    """
    new = requantize_bnb_weight(module, weight)
    if _check_layer(module) == 4:
        new.module = module
        module.weight = new
        module.quant_state = new.quant_state
        return
    module.weight = new
    module.state.reset_grads()  # drops CB / SCB cached by the last forward; the next forward reads the weight's


def add_to_bnb_weight(module: nn.Module, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """`W <- requant(dequant(W) + sign * delta)` in fp32, rounding once; returns the fp32 weight before rounding.

    This is the merge step (`delta = s B A`, sign +1), the unmerge step (sign -1) and the LoRA-GA offset
    (`W - s B A`). Raises ValueError when the result is not finite (nothing is changed then).
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}.")
    weight = dequantize_bnb_layer(module)
    new = weight + sign * delta.to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(new).all():
        raise ValueError(f"Adding the update to {type(module).__name__} gives NaN/Inf; the weight is left unchanged.")
    replace_bnb_weight(module, new)
    return new
