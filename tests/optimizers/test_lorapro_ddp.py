"""DDP (2 processes, gloo): `LoraProAdamW` adjusts the gradients after DDP has averaged them, so two processes
on half batches end with the same weights as one process on the combined batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from peft import LoraProConfig, get_peft_model
from peft.optimizers import LoraProAdamW

WORLD, STEPS = 2, 3


def _model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    config = LoraProConfig(r=2, lora_alpha=4, target_modules=["0", "2"], mode=mode, init_lora_weights=False)
    return get_peft_model(base, config)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen, dtype=torch.float64)


def _train(model: nn.Module, forward: nn.Module, rank: int, world: int) -> None:
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.01)
    for step in range(STEPS):
        x, y = _batch(step)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        ((forward(x[shard]) - y[shard]) ** 2).mean().backward()
        opt.step()


MODES = ("full", "efficient")


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        states = {}
        for mode in MODES:  # one spawn for both modes: starting processes is the slow part
            model = _model(mode)
            ddp = nn.parallel.DistributedDataParallel(model)
            _train(model, ddp, rank, WORLD)
            states[mode] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(states, out)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_on_the_combined_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
    ddp_states = torch.load(out, weights_only=True)
    for mode in MODES:
        single = _model(mode)
        _train(single, single, 0, 1)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(ddp_states[mode][key], value.detach(), atol=1e-12, rtol=1e-10,
                                       msg=f"{mode}: {key}")
        assert any("lora_B" in k for k in ddp_states[mode])


if os.name == "nt":  # gloo file:// rendezvous and spawn are exercised on POSIX only
    pytestmark = pytest.mark.skip(reason="POSIX only")
