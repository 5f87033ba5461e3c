"""The stacks `LoraProAdamW` steps: pairs of one shape, dtype, mode, x_mode, damping, scale s, step count, param group
and sharding, their factors and gradients stacked, so that a step costs a fixed number of kernel launches per stack
instead of about a hundred per pair (on a GPU the step is bound by launches, not by flops).

Under FSDP2 (`sharding.py`) a stack holds this rank's rows: A (k, r_i, n), B (k, m_i, r) and their gradients alike;
`gather` then makes A and gA whole (one all-gather per stack), `grams` sums the `B^T B` of every sharded stack (one
all-reduce), and `step_batch` passes the row sum to the math (`peft/tuners/lorapro/math.py`, "Row shards").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..tuners.lorapro import math as lp
from .pairs import LoraProPair
from .sharding import RowShards, local, pair_shards

MOMENTS = ("exp_avg", "exp_avg_sq")
# (parameter, global shape or None for a step count only, dtype, mode) -> its state, created at its first step
StateOf = Callable[[torch.Tensor, Optional[torch.Size], torch.dtype, str], dict]


@dataclass
class Batch:
    """k pairs that step together. A (k, r, n), B (k, m, r), gA, gB alike: the pairs' factors and gradients,
    stacked (with `shards`: this rank's rows of B and gB, and of A and gA until `gather` makes them whole); `r`, `m`:
    the global sizes."""

    pairs: list[LoraProPair]
    group: dict
    mode: str
    x_mode: str
    damping: float
    s: float
    step: int
    A: torch.Tensor
    B: torch.Tensor
    gA: torch.Tensor
    gB: torch.Tensor
    r: int
    m: int
    shards: Optional[RowShards] = None


def grad_of(param: torch.Tensor) -> torch.Tensor:
    """This rank's gradient of `param` (zeros when it has none)."""
    if param.grad is None:
        return torch.zeros_like(local(param))
    if param.grad.is_sparse:
        raise ValueError("LoRA-Pro optimizers do not support sparse gradients.")
    return local(param.grad)


def make_batches(pairs: list[LoraProPair], group_of: dict, options: Callable[[LoraProPair, dict], tuple],
                 step_of: Callable[[torch.Tensor], int]) -> list[Batch]:
    """`pairs` grouped by everything their step depends on besides their values, each group stacked, in the order
    of `pairs` (the same on every rank: the sharded stacks' collectives follow it)."""
    members: dict[tuple, list] = {}
    for pair in pairs:
        group, shards = group_of[id(pair.A)], pair_shards(pair.A, pair.B, pair.describe)
        mats = [local(t).detach().flatten(1) for t in (pair.A, pair.B)]  # (r_i, n), (m_i, r)
        grads = [grad_of(t).flatten(1) for t in (pair.A, pair.B)]
        sizes = (pair.A.shape[0], pair.B.shape[0])  # global r, m
        key = (*options(pair, group), pair.scaling, id(group), step_of(pair.A), mats[0].device,
               None if shards is None else id(shards.group), sizes, *((t.shape, t.dtype) for t in (*mats, *grads)))
        members.setdefault(key, []).append((pair, *mats, *grads, shards))
    batches = []
    for key, rows in members.items():
        (mode, x_mode, damping, s, _, step), (r, m) = key[:6], key[8]
        A, B, gA, gB = (torch.stack(ts) for ts in list(zip(*rows))[1:5])  # (k, r, n), (k, m, r), alike
        pairs_, group = [row[0] for row in rows], group_of[id(rows[0][0].A)]
        batches.append(Batch(pairs_, group, mode, x_mode, damping, s, step, A, B, gA, gB, r, m, rows[0][5]))
    return batches


def gather(batches: list[Batch]) -> None:
    """Make A and gA of every sharded stack whole (in the compute dtype): one all-gather of `[A, gA]` per stack."""
    for batch in batches:
        if batch.shards is not None:
            dtype, n = lp.compute_dtype(batch.A, batch.B, batch.gA, batch.gB), batch.A.shape[-1]
            whole = batch.shards.gather_rows(torch.cat([batch.A.to(dtype), batch.gA.to(dtype)], dim=-1), batch.r)
            batch.A, batch.gA = whole[..., :n], whole[..., n:]  # (k, r, n) each


def grams(batches: list[Batch]) -> list[lp.Grams]:
    """The decomposed Grams of every stack: one batched `eigh` per rank r and device (`lp.grams_batched`); the
    `B^T B` of the sharded stacks summed over their row shards first (one all-reduce per process group)."""
    b_grams: list[Optional[torch.Tensor]] = [None] * len(batches)
    by_group: dict[int, list[int]] = {}
    for i, batch in enumerate(batches):
        if batch.shards is not None:
            by_group.setdefault(id(batch.shards.group), []).append(i)
    for index in by_group.values():
        parts = [lp.gram_b(batches[i].B) for i in index]  # (k, r, r) each: this rank's rows
        summed = batches[index[0]].shards.row_sum(torch.cat([p.reshape(-1) for p in parts]))
        for i, part, flat in zip(index, parts, summed.split([p.numel() for p in parts])):
            b_grams[i] = flat.view_as(part)
    return lp.grams_batched([(b.A, b.B) for b in batches], [b.damping for b in batches], b_grams)


def step_batch(batch: Batch, g: lp.Grams, hp: lp.AdamHyper, state_of: StateOf) -> None:
    """Step the k pairs of `batch` with `g`, the decomposed Grams of its stacked (A, B), and write the new factors
    (this rank's rows of them) into the parameters."""
    dtype, step, n = lp.compute_dtype(batch.A, batch.B), batch.step + 1, batch.A.shape[-1]
    args = (batch.A, batch.B, batch.gA, batch.gB, batch.s)
    rows = {} if batch.shards is None else {"row_sum": batch.shards.row_sum, "a_rows": batch.shards.rows(batch.r)}
    if batch.mode == "full":  # (m, n) moments stay per pair, never stacked
        states = [state_of(pair.A, torch.Size((batch.m, n)), dtype, batch.mode) for pair in batch.pairs]
        new_A, new_B = lp.full_mode_step(*args, [local(st["exp_avg"]) for st in states],
                                         [local(st["exp_avg_sq"]) for st in states], step, hp, batch.x_mode,
                                         batch.damping, g, **rows)
        if batch.shards is not None:  # B's step count: torch.distributed.checkpoint wants state for every parameter
            states += [state_of(pair.B, None, dtype, batch.mode) for pair in batch.pairs]
    else:
        shape_A, shape_B = torch.Size((batch.r, n)), torch.Size((batch.m, batch.B.shape[-1]))
        states_A = [state_of(pair.A, shape_A, dtype, batch.mode) for pair in batch.pairs]
        states_B = [state_of(pair.B, shape_B, dtype, batch.mode) for pair in batch.pairs]
        per_param = [[local(st[key]) for st in sts] for sts in (states_A, states_B) for key in MOMENTS]  # 4 x k
        moments = tuple(torch.stack(ts) for ts in per_param)  # (k, r, n) x 2, (k, m, r) x 2: copies, stepped
        new_A, new_B = lp.efficient_mode_step(*args, moments, step, hp, batch.x_mode, batch.damping, g, **rows)
        torch._foreach_copy_([t for ts in per_param for t in ts], [t for m in moments for t in m.unbind(0)])
        states = states_A + states_B
    for st in states:
        st["step"] = step
    params = [local(pair.A) for pair in batch.pairs] + [local(pair.B) for pair in batch.pairs]
    news = [*new_A.unbind(0), *new_B.unbind(0)]  # (r, n) x k, (m, r) x k (this rank's rows)
    torch._foreach_copy_(params, [new.reshape(p.shape) for new, p in zip(news, params)])
