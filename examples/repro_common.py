"""Shared plumbing of the reproduction scripts (`examples/loraga_*.py`, `examples/lorapro_*.py`): device and
seed, a plain training loop, the LoRA-GA initialisation flow, the LoRA-Pro optimizer, and tiny offline stand-ins
for `--smoke`.

The real runs download models and data (Hugging Face Hub, `datasets`); `datasets` is imported lazily inside the
loaders of the non-smoke path only, so `--smoke` needs neither the network nor that package.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every reproduction script has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny random model and data, offline, a few steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the paper's epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--output-dir", default=None, help="where to save adapters (default: a temporary folder)")
    return p


def device_and_dtype(smoke: bool) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 if there is a GPU and this is not a smoke run, else CPU fp32."""
    if torch.cuda.is_available() and not smoke:
        return torch.device("cuda"), torch.bfloat16
    if smoke:
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and robust on a busy machine
    return torch.device("cpu"), torch.float32


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cycle(batches: Callable[[], Iterable[dict]]) -> Iterator[dict]:
    """Endless iterator over `batches()` (called again at the end of each epoch)."""
    while True:
        yield from batches()


def warmup_linear(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float = 0.03):
    """Linear warm-up over `warmup_ratio * steps`, then linear decay to 0 (the papers' schedule)."""
    warm = max(1, int(warmup_ratio * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[dict], steps: int,
          grad_accum: int = 1, autocast_dtype: torch.dtype | None = None, max_grad_norm: float | None = 1.0,
          log_every: int = 10) -> list[float]:
    """`steps` optimizer steps of `grad_accum` micro-batches each (loss from `model(**batch).loss`); returns the
    per-step mean loss. The optimizer (LoRA-Pro's included) sees the accumulated, clipped gradients once per step."""
    scheduler = warmup_linear(optimizer, steps)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        total = 0.0
        for _ in range(grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            with ctx:
                loss = model(**batch).loss / grad_accum
            loss.backward()
            total += loss.item()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(total):
            raise ValueError(f"Training loss became {total} at step {step}; expected a finite loss.")
        losses.append(total)
        if step % log_every == 0 or step == steps:
            rate = (time.perf_counter() - start) / step
            print(f"step {step}/{steps} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                  f"({rate:.2f} s/step)", flush=True)
    return losses


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def loraga_wrap(model: nn.Module, config, estimation_batches: list[dict], save_dir: str | None = None,
                quant_model: nn.Module | None = None, **estimate_kwargs) -> nn.Module:
    """The LoRA-GA flow of the paper's README: estimate the gradient on `estimation_batches`, initialise the
    adapter from it, save the initial adapter (so that the final save can be expressed on the original base).

    With `quant_model`, the gradient is estimated on the float `model` (pass `quant_flag=True` to offload it block
    by block) and the adapter is put on `quant_model` (its residual is requantized with the layer's settings)."""
    from peft import get_peft_model
    from peft.utils import lora_ga_utils as ga

    named_grad = ga.estimate_gradient(model=model, dataloader=estimation_batches, **estimate_kwargs)
    target = model if quant_model is None else quant_model
    with ga.LoraGAContext(model=target, named_grad=named_grad):
        peft_model = get_peft_model(model=target, peft_config=config, adapter_name="default")
    del named_grad
    if save_dir is not None:
        ga.save_loraga_model_init(peft_model, save_dir=save_dir)
    return peft_model


def lorapro_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """`peft.optimizers.LoraProAdamW` over a LoRA-Pro model (the mode comes from the model's LoraProConfig)."""
    from peft.optimizers import LoraProAdamW

    return LoraProAdamW(model, lr=lr, weight_decay=weight_decay)


def random_token_batches(vocab: int, n_batches: int, batch_size: int, seq: int, seed: int,
                         seq2seq: bool = False) -> list[dict]:
    """Random (input_ids, attention_mask, labels) batches for the smoke path of the language-model scripts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(2, vocab, (batch_size, seq), generator=gen)
        labels = torch.randint(2, vocab, (batch_size, 4), generator=gen) if seq2seq else ids.clone()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out
