"""LoRA invariant checks shared by the test matrix (and reusable by the LoRA-GA / LoRA-Pro tests).

The reference formulas here are written independently of `peft.tuners.lora` (plain `torch.nn.functional`):

    Linear:    y = x W^T + b + sum_a s_a x A_a^T B_a^T
    Conv1D:    y = x W + b + sum_a s_a x A_a^T B_a^T                  (W stored in x out)
    Embedding: y = E[x] + sum_a s_a (A_a^T)[x] B_a^T                  (A: r x vocab, B: dim x r)
    Conv2d:    y = conv(x, W) + b + sum_a s_a conv1x1(conv(x, A_a), B_a)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.lora.layer import LoraLayer
from peft.utils.other import ModulesToSaveWrapper


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter `name` as stored: Linear (r, in) / (out, r); Embedding (r, vocab) / (dim, r)."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


@torch.no_grad()
def randomize_adapter(model: nn.Module, adapter_name: str = "default", seed: int = 0, std: float = 0.3) -> None:
    """Give adapter `adapter_name` random non-zero A and B (so it changes the output) and perturb its
    `modules_to_save` copies (so they differ from the originals). Uses a private generator."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        if adapter_name not in layer.lora_A and adapter_name not in layer.lora_embedding_A:
            continue
        for tensor in factors(layer, adapter_name):
            tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=torch.float64).to(tensor.dtype) * std)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for param in module.modules_to_save[adapter_name].parameters():
                param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype) * std)


def reference_output(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output by the closed form in the module docstring (active, unmerged adapters)."""
    base = layer.get_base_layer()
    kind = type(base).__name__
    if isinstance(base, nn.Embedding):
        y = base.weight[x]
    elif isinstance(base, nn.Conv2d):
        y = F.conv2d(x, base.weight, base.bias, base.stride, base.padding, base.dilation)
    elif kind == "Conv1D":
        y = x @ base.weight + base.bias
    else:
        y = x @ base.weight.T + (base.bias if base.bias is not None else 0)
    if layer.disable_adapters:
        return y
    for name in layer.active_adapters:
        if name not in layer.r:
            continue
        A, B = factors(layer, name)
        s = layer.scaling[name]
        if isinstance(base, nn.Embedding):
            y = y + s * A.T[x] @ B.T
        elif isinstance(base, nn.Conv2d):
            h = F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
            y = y + s * F.conv2d(h, B)
        else:
            y = y + s * x @ A.T @ B.T
    return y


@contextmanager
def recorded_io(model: nn.Module) -> Iterator[dict]:
    """Record (input, output) of every LoRA layer during the forward passes inside the block."""
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, layer in lora_layers(model):
        def hook(module, args, output, name=name):
            records[name] = (args[0].detach(), output.detach())

        handles.append(layer.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def assert_layers_match_closed_form(model: nn.Module, inputs: dict, atol: float = 1e-10) -> int:
    """Run `model(**inputs)` and check every LoRA layer's output against `reference_output`; returns the number
    of layers checked (a test asserts it is > 0)."""
    with recorded_io(model) as records, torch.no_grad():
        model(**inputs)
    layers = dict(lora_layers(model))
    for name, (x, y) in records.items():
        expected = reference_output(layers[name], x)
        err = (y - expected).abs().max().item()
        assert err <= atol, f"{name}: LoRA output differs from the closed form by {err:.3e}"
    return len(records)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every LoRA layer's base weight, keyed by layer name."""
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in lora_layers(model)}


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def module_snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave alone: module types, state dict values, requires_grad, train mode."""
    return {
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "attrs": sorted(vars(model).keys()),
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["types"] == after["types"], "module structure changed"
    assert before["state"].keys() == after["state"].keys(), "state_dict keys changed"
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{key} changed"
    assert before["grad"] == after["grad"], "requires_grad changed"
    assert before["training"] == after["training"], "train/eval mode changed"
    assert before["attrs"] == after["attrs"], "instance attributes changed"
