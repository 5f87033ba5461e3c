"""`LoraProAdamW(..., shard_moments=True)`: the optimizer state partitioned across the ranks of the default process
group, as `torch.distributed.optim.ZeroRedundancyOptimizer` does, for data parallelism with whole parameters (DDP),
where every rank holds the same parameters and, after DDP's all-reduce, the same gradients.

A *unit* is what steps as one: a LoRA-Pro pair (A and B together: full mode's (m, n) moments belong to both) or a
trainable parameter that is no LoRA factor (a head, biases: sharded too, so that every piece of state lives on one
rank). Each unit gets one owner when the optimizer is built, balanced by state size: largest first, each to the
least-loaded rank, where a unit weighs its optimizer-state numbers (`m n` for a full-mode pair, `r (m + n)` for an
efficient one, `numel` for a plain parameter). A step: every rank checks every gradient (the same everywhere, so
every rank takes or skips the step alike), steps the units it owns, creating and keeping only their state, then
broadcasts their parameters (one broadcast per rank and dtype), after which all ranks hold the same parameters, equal
to those of an unsharded optimizer.

Checkpoints: each rank's `state_dict()` holds the state of its units and records the partition
(`"shard_moments": {"world_size", "rank", "owners"}`, `owners[i]` the rank owning parameter #i in param-group order),
so a job saves one file per rank and resumes exactly with the same world size (`load_state_dict` refuses another
world size, another rank's file, or another partition, naming which). An unsharded state dict loads too (each rank
keeps its units' state), so a single-process checkpoint resumes on several ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

KEY = "shard_moments"


@dataclass(frozen=True)
class Partition:
    """Who steps what: `owner[id(param)]` is the rank stepping the unit that holds `param`; `owned[k]` the parameters
    of rank k's units (broadcast from k after each step)."""

    world: int
    rank: int
    owner: dict[int, int]
    owned: tuple[tuple[torch.Tensor, ...], ...]

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank steps `param` (one added later with `add_param_group` is stepped on every rank)."""
        return self.owner.get(id(param), self.rank) == self.rank

    def owners(self, params: Sequence[torch.Tensor]) -> list[int]:
        """The owner of each of `params` (-1: every rank)."""
        return [self.owner.get(id(p), -1) for p in params]

    def broadcast(self) -> None:
        """Every rank's parameters from it to the others: one broadcast per rank and dtype."""
        for src, params in enumerate(self.owned):
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for param in params:
                by_dtype.setdefault(param.dtype, []).append(param)
            for group in by_dtype.values():
                flat = torch.cat([p.detach().reshape(-1) for p in group])
                dist.broadcast(flat, src=src)
                if src != self.rank:
                    torch._foreach_copy_(group, [part.view_as(p) for part, p in
                                                 zip(flat.split([p.numel() for p in group]), group)])


def assign_owners(costs: Sequence[int], world: int) -> list[int]:
    """The owner rank of each unit of `costs` (state sizes): largest first (ties: first in order), each to the
    least-loaded rank (ties: the lowest). Deterministic, so every rank computes the same partition."""
    load, owners = [0] * world, [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[index] = min(range(world), key=lambda k: (load[k], k))
        load[owners[index]] += costs[index]
    return owners


def build_partition(units: Sequence[tuple[Sequence[torch.Tensor], int]]) -> Partition:
    """The partition of `units` ((parameters, state size) each, in the same order on every rank) over the default
    process group (`assign_owners`)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_moments=True partitions the optimizer state across the ranks of the default process "
                         "group, but torch.distributed is not initialised: call torch.distributed.init_process_group "
                         "(torchrun does the rendezvous) before building the optimizer, or leave shard_moments=False.")
    world, rank = dist.get_world_size(), dist.get_rank()
    owned: list[list[torch.Tensor]] = [[] for _ in range(world)]
    owner: dict[int, int] = {}
    for (params, _), k in zip(units, assign_owners([cost for _, cost in units], world)):
        for param in params:
            owner[id(param)] = k
            owned[k].append(param)
    return Partition(world, rank, owner, tuple(tuple(ps) for ps in owned))


def record(state_dict: dict, partition: Partition, params: Sequence[torch.Tensor]) -> dict:
    """`state_dict` with the partition recorded under `KEY`."""
    return {**state_dict, KEY: {"world_size": partition.world, "rank": partition.rank,
                                "owners": partition.owners(params)}}


def check_loadable(state_dict: dict, partition: Partition | None, params: Sequence[torch.Tensor]) -> None:
    """Raise ValueError when `state_dict` was saved with another partition than `partition` (None: unsharded)."""
    saved = state_dict.get(KEY)
    if saved is None:
        return  # an unsharded state: every rank keeps its units' entries (`drop_unowned`)
    where = f"rank {saved['rank']} of {saved['world_size']}"
    if partition is None:
        raise ValueError(f"This optimizer state was saved by LoraProAdamW(..., shard_moments=True) on {where} and "
                         "holds that rank's share only; load each rank's file into the sharded optimizer on as many "
                         "ranks.")
    if saved["world_size"] != partition.world:
        raise ValueError(f"This optimizer state was saved sharded over {saved['world_size']} ranks, and is loaded "
                         f"on {partition.world}: resume with world size {saved['world_size']} (each rank loads its own "
                         "file), or from an unsharded checkpoint.")
    if saved["rank"] != partition.rank:
        raise ValueError(f"This optimizer state is the share of {where}, loaded on rank {partition.rank}: each rank "
                         "loads the file it saved.")
    if list(saved["owners"]) != partition.owners(params):
        raise ValueError("This optimizer state was saved with another partition of the parameters across the ranks "
                         "(different parameters, modes or order): build the optimizer as it was built when saving.")


def drop_unowned(state: dict, partition: Partition) -> None:
    """Remove from `state` (optimizer.state) the entries of parameters another rank owns."""
    for param in [p for p in state if not partition.owns(p)]:
        del state[param]
