"""Block-by-block execution with CPU offload for `estimate_gradient(quant_flag=True)`.

The model's repeated blocks (`no_split_module_classes`, e.g. `LlamaDecoderLayer`) stay on the CPU; they are split
into `k = bits(origin_type) / bits(quant_type)` contiguous chunks (4 for bf16 -> nf4: the float weights on the
accelerator at any time are about the size of the quantized model). A chunk is moved to the accelerator when one of
its blocks runs and moved back when another chunk is needed. Every block runs under activation checkpointing, so
between blocks only their inputs are kept, and in the backward pass each block is recomputed (its chunk brought
back) right before its gradients are taken. On a CPU-only machine the same path runs with no transfers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "nf4": 4, "fp4": 4}


def num_chunks(origin_type: str, quant_type: str) -> int:
    """`bits(origin_type) // bits(quant_type)`, e.g. 4 for ("bf16", "nf4")."""
    for name, value in (("origin_type", origin_type), ("quant_type", quant_type)):
        if value not in BITS:
            raise ValueError(f"Invalid {name}={value!r}: expected one of {sorted(BITS)}.")
    return max(1, BITS[origin_type] // BITS[quant_type])


def find_blocks(model: nn.Module, no_split_module_classes: Optional[Sequence[str]] = None) -> list[nn.Module]:
    """The outermost modules whose class name is in `no_split_module_classes` (default: `model._no_split_modules`)."""
    names = list(no_split_module_classes or getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError("quant_flag=True needs no_split_module_classes (e.g. ['LlamaDecoderLayer']); the model "
                         "declares no _no_split_modules.")
    blocks, inside = [], set()
    for _, module in model.named_modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        blocks.append(module)
        inside.update(id(m) for m in module.modules())
    if not blocks:
        raise ValueError(f"No module of class {names} in {type(model).__name__}; check no_split_module_classes.")
    return blocks


class _Residency:
    """Keeps at most one chunk of blocks on `device`; the others wait on the CPU.

    The weights do not change during the estimation, so a chunk is evicted by pointing its tensors back at the CPU
    copies they came from (no device-to-host copy); only the host-to-device copy is paid, once per activation."""

    def __init__(self, chunks: list[list[nn.Module]], device: torch.device) -> None:
        self.chunks, self.device, self.current = chunks, device, None
        self._home: dict[tuple[int, str], torch.Tensor] = {}  # (id(module), name) -> the CPU tensor

    def activate(self, index: int) -> None:
        if index == self.current:
            return
        if self.current is not None:
            self._evict(self.current)
        with torch.no_grad():
            for block in self.chunks[index]:
                for module in block.modules():
                    for name, param in module.named_parameters(recurse=False):
                        self._home[(id(module), name)] = param.data
                        param.data = param.data.to(self.device)
                    for name, buf in module.named_buffers(recurse=False):
                        self._home[(id(module), name)] = buf
                        module._buffers[name] = buf.to(self.device)
        self.current = index

    def _evict(self, index: int) -> None:
        with torch.no_grad():
            for block in self.chunks[index]:
                for module in block.modules():
                    for name, param in module.named_parameters(recurse=False):
                        param.data = self._home.pop((id(module), name))
                    for name in list(module._buffers):
                        if (id(module), name) in self._home:
                            module._buffers[name] = self._home.pop((id(module), name))

    def release(self) -> None:
        """Evict the resident chunk (the blocks are back on their CPU tensors)."""
        if self.current is not None:
            self._evict(self.current)
            self.current = None


def _checkpointed(forward, residency: _Residency, index: int):
    def run(*args, **kwargs):
        residency.activate(index)
        return forward(*args, **kwargs)

    def wrapped(*args, **kwargs):
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return wrapped


@contextlib.contextmanager
def block_offload(
    model: nn.Module, device: torch.device, no_split_module_classes: Optional[Sequence[str]] = None,
    origin_type: str = "bf16", quant_type: str = "nf4",
) -> Iterator[int]:
    """Run `model` block by block inside the context (yields the number of chunks). On exit every module is back on
    its original device, every patched `forward` is restored and `config.use_cache` is what it was."""
    blocks = find_blocks(model, no_split_module_classes)
    k = min(num_chunks(origin_type, quant_type), len(blocks))
    size = -(-len(blocks) // k)
    chunks = [blocks[i:i + size] for i in range(0, len(blocks), size)]
    home = _devices(model)
    residency = _Residency(chunks, torch.device(device))
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    block_ids = {id(m) for block in blocks for m in block.modules()}
    try:
        if use_cache is not None:
            config.use_cache = False  # a cache would be written twice (forward, then recompute)
        for block in blocks:
            block.to("cpu")
        for module in model.modules():
            if id(module) not in block_ids:
                _move_own(module, torch.device(device))
        for index, chunk in enumerate(chunks):
            for block in chunk:
                block.forward = _checkpointed(block.forward, residency, index)
        yield len(chunks)
    finally:
        residency.release()
        for block in blocks:
            block.__dict__.pop("forward", None)
        if use_cache is not None:
            config.use_cache = use_cache
        _restore_devices(model, home)


def _devices(model: nn.Module) -> dict[tuple[int, str], torch.device]:
    """(id(module), tensor name) -> device, for every parameter and buffer a module owns directly."""
    out = {}
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            out[(id(module), name)] = tensor.device
    return out


def _move_own(module: nn.Module, device: torch.device, home: Optional[dict] = None) -> None:
    """Move the parameters (in place, keeping identity) and buffers `module` owns directly."""
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=False):
            target = device if home is None else home.get((id(module), name), param.device)
            if param.device != target:
                param.data = param.data.to(target)
        for name, buf in module.named_buffers(recurse=False):
            target = device if home is None else home.get((id(module), name), buf.device)
            if buf.device != target:
                module._buffers[name] = buf.to(target)


def _restore_devices(model: nn.Module, home: dict) -> None:
    for module in model.modules():
        _move_own(module, torch.device("cpu"), home)
