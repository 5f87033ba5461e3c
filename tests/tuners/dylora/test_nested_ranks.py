"""DyLoRA's mechanism: after training with sampled ranks, every truncation b <= r is close to the best rank-b
update, while plain LoRA (DyLoRA with r_min = r: always full rank) truncated to b loses far more.

Task: learn `y = W0 x + D x` with `D` of rank 4 and singular values (4, 2, 1, 0.5), x ~ N(0, I). The expected
squared error of an update U is `||D - U||_F^2`, so the best rank-b error is the sum of the discarded sigma_i^2."""

from __future__ import annotations

import functools

import torch
from torch import nn

from peft import DyLoRAConfig, get_peft_model

SIGMAS = (4.0, 2.0, 1.0, 0.5)
R, D = 4, 16
BEST = {b: sum(s * s for s in SIGMAS[b:]) for b in range(1, R + 1)}  # 5.25, 1.25, 0.25, 0


@functools.lru_cache(maxsize=None)
def rank_losses(r_min: int, fixed_scale: bool, update_mode: str = "frozen", steps: int = 700) -> dict[int, float]:
    """Test loss at every eval rank after training; cached (several tests read the same runs)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D, D))
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    target = U[:, :R] @ torch.diag(torch.tensor(SIGMAS)) @ V[:, :R].T
    cfg = DyLoRAConfig(target_modules=["0"], r=R, r_min=r_min, lora_alpha=R, update_mode=update_mode, rank_seed=0,
                       fixed_scale=fixed_scale)
    model = get_peft_model(base, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        x = torch.randn(64, D, generator=g)
        with torch.no_grad():
            y = model.base_model.model[0].base_layer(x) + x @ target.T
        loss = ((model(x) - y) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(1024, D, generator=torch.Generator().manual_seed(9))
    losses = {}
    with torch.no_grad():
        y = model.base_model.model[0].base_layer(x) + x @ target.T
        for b in range(1, R + 1):
            model.base_model.set_rank(b)
            losses[b] = ((model(x) - y) ** 2).sum(-1).mean().item()
    return losses


def excess(losses: dict[int, float]) -> dict[int, float]:
    return {b: losses[b] - BEST[b] for b in losses}


def test_plain_lora_baseline_trains_but_truncates_badly():
    lora = rank_losses(R, False)
    assert lora[R] < 0.05  # the full-rank update is learned
    assert all(excess(lora)[b] > 2.0 for b in range(1, R))  # truncating an unordered factorisation hurts


def test_fixed_scale_every_truncation_near_best():
    dy, lora = excess(rank_losses(1, True)), excess(rank_losses(R, False))
    for b in range(1, R + 1):
        assert dy[b] < 0.3, (b, dy)
        if b < R:
            assert dy[b] < 0.1 * lora[b], (b, dy, lora)


def test_paper_scale_truncations_beat_plain_lora():
    """With the paper's `alpha / b` a component's weight depends on b, so the ranks share a compromise: rank 1 is
    near its best, and the summed excess over b < r is a fraction of plain LoRA's."""
    dy, lora = excess(rank_losses(1, False)), excess(rank_losses(R, False))
    assert dy[1] < 0.1 * lora[1], (dy, lora)
    assert sum(dy[b] for b in range(1, R)) < 0.4 * sum(lora[b] for b in range(1, R)), (dy, lora)
    assert all(dy[b] < lora[b] for b in range(1, R)), (dy, lora)


def test_all_mode_also_nests():
    dy, lora = excess(rank_losses(1, True, "all")), excess(rank_losses(R, False))
    assert all(dy[b] < 0.1 * lora[b] for b in range(1, R)), (dy, lora)
