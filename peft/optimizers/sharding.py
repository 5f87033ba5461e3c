"""LoRA-Pro under FSDP2 (`torch.distributed.fsdp.fully_shard`): the factors as DTensor row shards.

`fully_shard` makes every parameter of a sharded module a DTensor with placement `Shard(0)` over a 1-D device mesh:
A (r, n) is split on its r rows, B (m, r) on its m rows, as `torch.chunk` splits (`ceil(d / world)` rows per rank,
the last ranks fewer or none), and their gradients alike (averaged over the ranks). LoRA-Pro's step then needs, per
pair (`peft/tuners/lorapro/math.py`, "Row shards"):

- A and gA whole: one all-gather of the (r, 2n) stack `[A, gA]` per stack of same-shape pairs (small);
- the sums over the row shards of the products that contract over m: `B^T B` (r, r; one all-reduce for every
  stack of the step), `B^T gB` (r, r) and, in full mode, `B^T U` (r, n);

and nothing else: B, gB, full mode's (m, n) moments, the equivalent gradient g~ and the Adam direction U stay on the
rank that holds those rows. So full mode's moments are DTensors sharded like B's rows (`new_state`): each rank holds
about 1/world of them, and the state round-trips through `state_dict()` and `torch.distributed.checkpoint` like
AdamW's under FSDP2.

FSDP1 (`FullyShardedDataParallel`) flattens a module's parameters into one `FlatParameter` and splits that across
the ranks without regard to rows, so no rank holds rows of A or B; it is refused (`refuse_fsdp1`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without torch.distributed.tensor: nothing is ever sharded
    DTensor, Shard = (), None

_FSDP1_HELP = ("use FSDP2 instead: `torch.distributed.fsdp.fully_shard` on the model's blocks and on the model "
               "(transformers' Trainer / accelerate: fsdp_version=2), which keeps each LoRA factor's rows on a rank.")


def is_sharded(t: Optional[torch.Tensor]) -> bool:
    """Whether `t` is a DTensor (an FSDP2 parameter or gradient)."""
    return bool(DTensor) and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (sharing its storage: in-place changes reach the DTensor); `t` itself else."""
    return t.to_local() if is_sharded(t) else t


@dataclass(frozen=True, eq=False)
class RowShards:
    """A DTensor factor split on dim 0 (`Shard(0)`) over the 1-D mesh `mesh`: this rank is `rank` of `world` in
    `group`. Rows are split as `torch.chunk` splits them."""

    mesh: object  # DeviceMesh
    group: object  # ProcessGroup
    rank: int
    world: int

    def rows(self, d: int) -> slice:
        """This rank's rows of a dimension of size d: `[rank c, (rank + 1) c)`, c = ceil(d / world), clipped to d."""
        chunk = -(-d // self.world)
        return slice(min(self.rank * chunk, d), min((self.rank + 1) * chunk, d))

    def row_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks (a new tensor; one all-reduce)."""
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=self.group)
        return out

    def gather_rows(self, part: torch.Tensor, d: int) -> torch.Tensor:
        """(..., d, c) whole from this rank's rows `part` (..., d_i, c): one all-gather of the parts padded to
        ceil(d / world) rows."""
        chunk = -(-d // self.world)
        padded = F.pad(part, (0, 0, 0, chunk - part.shape[-2])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts, dim=-2)[..., :d, :]


def row_shards(param: torch.Tensor, what: Callable[[], str]) -> Optional[RowShards]:
    """How the DTensor `param` is split (None for a plain tensor). Raises ValueError, naming `what()`, for a
    placement other than fully_shard's default (`Shard(0)` on a 1-D mesh)."""
    if not is_sharded(param):
        return None
    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"{what()} is a DTensor with placements {placements} on a {mesh.ndim}-d mesh; LoRA-Pro supports FSDP2's "
            "default sharding only, Shard(0) on a 1-d mesh (fully_shard without shard_placement_fn, no HSDP / "
            "tensor parallelism)."
        )
    return RowShards(mesh, mesh.get_group(0), mesh.get_local_rank(0), mesh.size(0))


def pair_shards(A: torch.Tensor, B: torch.Tensor, what: Callable[[], str]) -> Optional[RowShards]:
    """The row split of a pair's factors: both plain (None) or both `Shard(0)` on the same mesh (`what()` names the
    pair in errors)."""
    sa, sb = row_shards(A, lambda: f"A of {what()}"), row_shards(B, lambda: f"B of {what()}")
    if (sa is None) != (sb is None) or (sa is not None and sa.mesh != sb.mesh):
        raise ValueError(f"A and B of {what()} are sharded differently ({type(A).__name__} / {type(B).__name__}); "
                         "fully_shard the module that holds both (its LoRA layer or a block above it).")
    return sa


def new_state(param: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of the global `shape` for the optimizer state of `param`: a plain tensor for a plain parameter; for a
    DTensor, a DTensor placed like it (`shape` = its shape) or, for full mode's (m, n) moments kept on A, split on
    its rows over A's mesh like B's rows (so each rank holds the rows of B it holds)."""
    if not is_sharded(param):
        return torch.zeros(shape, dtype=dtype, device=param.device)
    if tuple(shape) == tuple(param.shape):
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    shards = row_shards(param, lambda: "a LoRA factor")
    rows = shards.rows(shape[0])
    part = torch.zeros((rows.stop - rows.start, *shape[1:]), dtype=dtype, device=local(param).device)
    return DTensor.from_local(part, param.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def agree_finite(finite: bool, groups: Iterable[object], device: torch.device) -> bool:
    """Whether the gradients are finite on every rank of `groups` (each rank checked its own shards): one
    all-reduce per group, so that every rank takes (or skips) the step. `device`: where the group's backend takes
    tensors (the parameters' device: NCCL takes CUDA tensors only)."""
    for group in groups:
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        finite = finite and flag.item() == 0.0
    return finite


def _is_fsdp1_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return isinstance(module, FullyShardedDataParallel)


def refuse_fsdp1(model: Optional[nn.Module] = None, params: Iterable[torch.Tensor] = ()) -> None:
    """Raise ValueError when `model` holds FSDP1 modules or `params` FSDP1's flat parameters."""
    if model is not None and any(_is_fsdp1_module(m) for m in model.modules()):
        raise ValueError("LoraProAdamW does not support FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel): "
                         "its flat parameters split the LoRA factors across the ranks without regard to their rows; "
                         + _FSDP1_HELP)
    for param in params:
        if getattr(param, "_is_flat_param", False):
            raise ValueError("LoraProAdamW got an FSDP1 FlatParameter (torch.distributed.fsdp."
                             "FullyShardedDataParallel flattens a module's parameters into one); " + _FSDP1_HELP)


def refuse_flattened_factor(factor: torch.Tensor, what: str) -> None:
    """Raise ValueError for a LoRA factor flattened to 1-d: FSDP1 with `use_orig_params=True` leaves the original
    parameters as 1-d views of each rank's piece of its flat parameter."""
    if factor.dim() < 2:
        raise ValueError(f"{what} is a {factor.dim()}-d tensor of shape {tuple(factor.shape)}, not a matrix: "
                         "FSDP1 (FullyShardedDataParallel, use_orig_params=True) flattened and split it; "
                         + _FSDP1_HELP)
