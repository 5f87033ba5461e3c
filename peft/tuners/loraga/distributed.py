"""LoRA-GA across processes (arXiv 2407.05000, Algorithm 1 run by several ranks): FSDP2-sharded models and DDP.

Gradient sums (`estimate_gradient`):

- FSDP2 (`fully_shard`): a sharded weight's gradient reaches its post-accumulate-grad hook as a DTensor shard,
  already averaged over the ranks by FSDP's reduce-scatter. Each rank adds its local shard to an fp32 sum, and the
  result is a DTensor of the weight's layout: a rank holds 1/world of the sums, and nothing is gathered.
- DDP (replicated weights) with `reduce_to="owner"`: each rank sums its own batches' gradients, then each target's
  sum is reduced to the one rank that owns it (a reduce-scatter by target, `reduce_to_owners`): after the reduction
  a rank holds its own targets' means only, about 1/world of them (`OwnedGradients`).

Owners (`assign_owners`): targets are spread over the ranks by size, largest first to the least loaded rank, the
same way on every rank.

Initialisation (`init_factors`): in rounds, each rank takes the next of its own targets, receives that target's
full G (gathered from the shards, or its own reduced mean), computes A and B, and broadcasts them; every rank then
writes its part of A and B (its shard under FSDP2) and offsets its part of W. A rank holds one full G at a time,
and the SVDs of a round run in parallel. Low-rank gradients (`estimate_gradient(low_rank=k)`, also under FSDP2:
the hooks see whole activations, so the sketches are all-reduced like DDP's) are the same U, S, Vh on every rank:
each rank computes their A and B itself, without rounds or broadcasts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch
from torch import nn

from .context import normalize_name
from .init_math import offset_weight

if TYPE_CHECKING:
    from ..lora.layer import LoraLayer

GUIDE = "docs/loraga.md, 'Large models: several GPUs'"


def _dist():
    import torch.distributed as dist

    return dist


def process_group_ready() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor` (the tensor itself unless it is a DTensor); shares its storage."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor`: a DTensor is gathered (a collective), any other tensor is itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


# --- setup checks ----------------------------------------------------------------------------------------------
def check_parallel_setup(model: Optional[nn.Module], weights: Iterable[torch.Tensor]) -> None:
    """Refuse what LoRA-GA cannot run on: FSDP1 anywhere in `model` (`ValueError`), DTensor `weights` without an
    initialised process group (`RuntimeError`), DTensors laid out other than by FSDP2's `fully_shard` (`ValueError`)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        FullyShardedDataParallel = None  # noqa: N806
    if model is not None and FullyShardedDataParallel is not None and any(
            isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "LoRA-GA does not support FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel): its flat parameters "
            "hide each weight's gradient. Shard the model with FSDP2 instead: torch.distributed.fsdp.fully_shard on "
            f"the decoder layers, then on the model (with accelerate: fsdp_version 2); see {GUIDE}.")
    sharded = [w for w in weights if is_dtensor(w)]
    if sharded and not process_group_ready():
        raise RuntimeError(
            "The model holds DTensor weights (FSDP2 / tensor parallel) but no torch.distributed process group is "
            "initialised in this process: call torch.distributed.init_process_group(...) in every process (e.g. under "
            f"torchrun) before estimating or initialising LoRA-GA; see {GUIDE}.")
    for weight in sharded:
        check_layout(weight)


def reshard(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters on every `fully_shard`-ed module of `model` and of the FSDP tree it
    belongs to (the root, e.g. the PeftModel around a tuner's model, keeps its unsharded parameters after a forward
    pass): the estimation must hook, and the init write, the sharded ones (writes into unsharded ones are lost)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules[:1]:  # after the first forward pass, every state of the tree is listed in each one
        states = getattr(getattr(module._get_fsdp_state(), "_state_ctx", None), "all_states", ())
        fsdp_modules += [m for state in states for m in getattr(state, "_modules", ()) if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.reshard()


def check_layout(tensor) -> None:
    """FSDP2's layout: Shard(0) (or Replicate) on a 1-D mesh."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(tensor.placements)
    if tensor.device_mesh.ndim != 1 or placements[0] not in (Shard(0), Replicate()):
        raise ValueError(
            f"LoRA-GA supports DTensor weights laid out by FSDP2's fully_shard on a 1-D mesh (Shard(0)); got "
            f"placements {placements} on a {tensor.device_mesh.ndim}-D mesh (HSDP and tensor parallelism are not "
            "supported).")


# --- layout of a Shard(0) DTensor --------------------------------------------------------------------------------
def row_range(tensor) -> tuple[int, int]:
    """Rows [lo, hi) of the global tensor held by this rank: dim 0 split as `torch.chunk` does (FSDP2's Shard(0);
    the last ranks may hold fewer rows, or none)."""
    from torch.distributed.tensor import Replicate

    rows = tensor.shape[0]
    if not is_dtensor(tensor) or tensor.placements[0] == Replicate():
        return 0, rows
    chunk = -(-rows // tensor.device_mesh.size())
    lo = min(tensor.device_mesh.get_local_rank() * chunk, rows)
    return lo, min(lo + chunk, rows)


def copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """`param <- full` (global layout), into this rank's shard when `param` is a DTensor (in place: FSDP2 keeps its
    storage)."""
    lo, hi = row_range(param)
    target = local(param)
    if target.shape != full[lo:hi].shape:
        raise RuntimeError(f"Shard of shape {tuple(target.shape)} does not match rows {lo}:{hi} of "
                           f"{tuple(full.shape)}.")
    with torch.no_grad():
        target.copy_(full[lo:hi])


def gather_to(tensor, owner: int) -> Optional[torch.Tensor]:
    """The full tensor on mesh rank `owner` (None on the others), from the Shard(0) shards of DTensor `tensor`: a
    collective, every rank of the mesh calls it. The shards are padded to the chunk size for the gather."""
    from torch.distributed.tensor import Replicate

    mesh = tensor.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    part = tensor.to_local()
    if tensor.placements[0] == Replicate():
        return part if rank == owner else None
    chunk = -(-tensor.shape[0] // world)
    send = part.new_zeros((chunk, *tensor.shape[1:]))
    send[: part.shape[0]] = part
    full = part.new_empty((world * chunk, *tensor.shape[1:])) if rank == owner else None
    _dist().gather(send, list(full.split(chunk)) if full is not None else None, group=mesh.get_group(),
                   group_dst=owner)
    return full[: tensor.shape[0]] if full is not None else None


def offset_shard(weight, kind: str, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
    """`W <- W - s B A` on this rank's rows [lo, hi) of a Shard(0) weight (FSDP2), from the full A (r, n), B (m, r):
    stored rows are rows of (m, n) for Linear / Conv2d, columns for Conv1D / Embedding (stored transposed)."""
    part, (lo, hi) = weight.to_local(), row_range(weight)
    if kind in ("conv1d", "embedding"):
        new = offset_weight(part.T, A[:, lo:hi], B, scaling).T  # (hi - lo, m)
    else:
        new = offset_weight(part.flatten(1), A, B[lo:hi], scaling)  # (hi - lo, n)
    part.copy_(new.reshape(part.shape))


# --- owners and the owner-only reduction ---------------------------------------------------------------------------
def assign_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """name -> rank: largest `sizes` first, each to the rank with the fewest elements so far (ties: the lower rank;
    equal sizes in name order), so every rank computes the same owners and each holds about 1/world of the total."""
    load, owners = [0] * world, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda j: (load[j], j))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


class OwnedGradients(dict):
    """What `estimate_gradient(..., reduce_to="owner")` returns under DDP: module name -> averaged gradient for the
    targets this rank owns only; `owners` maps every estimated module name to its owner rank and `shapes` to its
    weight's shape. `LoraGAContext` + `get_peft_model` and `LoraGAModel.initialise_adapter` take it as they take the
    plain dict (the SVD of each target then runs on its owner, and A, B are broadcast)."""

    def __init__(self, owned: dict, owners: dict[str, int], shapes: dict[str, tuple]) -> None:
        super().__init__(owned)
        self.owners, self.shapes = dict(owners), dict(shapes)

    def rekeyed(self, rename: Callable[[str], str]) -> "OwnedGradients":
        return OwnedGradients({rename(k): v for k, v in self.items()}, {rename(k): r for k, r in self.owners.items()},
                              {rename(k): s for k, s in self.shapes.items()})


def is_distributed(grads, weights: Iterable[torch.Tensor] = ()) -> bool:
    """The collective init is needed: owner-only (`OwnedGradients`) or sharded (DTensor) gradients, or sharded
    target `weights` (FSDP2; full gradients then serve as they are, each SVD still on one rank)."""
    return (isinstance(grads, OwnedGradients) or any(is_dtensor(g) for g in grads.values())
            or any(is_dtensor(w) for w in weights))


def gradient_names(grads) -> list[str]:
    """Every module name `grads` covers (on any rank), sorted."""
    return sorted(set(grads) | set(getattr(grads, "owners", ())))


def comm_device(group=None) -> torch.device:
    """Where tensors must be for the group's collectives: the current CUDA device under NCCL, else the CPU."""
    backend = str(_dist().get_backend(group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def reduce_to_owners(means: dict[str, torch.Tensor], count: int) -> OwnedGradients:
    """Each target's mean over all ranks' batches (weighted by each rank's `count`, = one process on all of them)
    reduced onto its owner only; `means` (this rank's means over its own batches; aliases share a tensor) is emptied
    as it goes, so a rank keeps only what it owns. A collective over the default group; values come back on their
    device (the CPU for `estimate_gradient`)."""
    dist = _dist()
    rank, world, device = dist.get_rank(), dist.get_world_size(), comm_device()
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    aliases: dict[int, list[str]] = {}
    for name in sorted(means):
        aliases.setdefault(id(means[name]), []).append(name)
    groups = {names[0]: names for names in aliases.values()}
    first_owner = assign_owners({first: means[first].numel() for first in groups}, world)
    owners = {name: first_owner[first] for first, names in groups.items() for name in names}
    shapes = {name: tuple(t.shape) for name, t in means.items()}
    owned = {}
    for first in sorted(groups):
        mean = means.pop(first)
        for name in groups[first][1:]:
            means.pop(name)
        home = mean.device
        buf = mean.mul_(count) if mean.device == device else mean.to(device).mul_(count)  # this rank's sum
        del mean
        dist.reduce(buf, dst=owners[first])
        if rank == owners[first]:
            result = buf.div_(total.item()).to(home)
            owned.update({name: result for name in groups[first]})
        del buf
    return OwnedGradients(owned, owners, shapes)


# --- the collective initialisation ---------------------------------------------------------------------------------
def _group_of(weights: list[torch.Tensor]):
    """The process group the init runs over: the mesh of the DTensor weights (FSDP2), else the default group."""
    meshes = []  # equal meshes (each fully_shard call without a mesh makes its own) count once
    for mesh in (w.device_mesh for w in weights if is_dtensor(w)):
        if mesh not in meshes:
            meshes.append(mesh)
    if len(meshes) > 1:
        raise ValueError(f"LoRA-GA's targets are sharded over different device meshes ({meshes}); expected one.")
    mesh = meshes[0] if meshes else None
    if mesh is not None and mesh.size() != _dist().get_world_size():
        raise ValueError(f"LoRA-GA expects the FSDP2 mesh to span every process: mesh of {mesh.size()} ranks, world "
                         f"of {_dist().get_world_size()}.")
    return None if mesh is None else mesh.get_group()


def _agree(error: Optional[BaseException], what: str, group, device: torch.device) -> None:
    """Raise on every rank if any rank failed (its own error there), instead of leaving the others waiting."""
    dist = _dist()
    flag = torch.tensor([dist.get_rank(group) + 1 if error is not None else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if flag.item():
        raise RuntimeError(f"LoRA-GA: rank {int(flag.item()) - 1} failed while {what}; see its error.")


def _broadcast_pair(pair, shapes, dtypes, owner: int, group, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from rank `owner` (which passes `pair`) to every rank of `group` (which pass None)."""
    out = []
    for k, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        if pair is not None:
            tensor = pair[k].to(device=device, dtype=dtype).contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        _dist().broadcast(tensor, group=group, group_src=owner)
        out.append(tensor)
    return out[0], out[1]


def init_factors(layers: list[tuple[str, "LoraLayer"]], adapter_name: str, grads, options
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-GA A, B of `adapter_name` for every (key, layer) of `layers`, each target's SVD run once, on its owner,
    and broadcast; written into every rank's A and B (its shard under FSDP2) once all are computed. Returns key ->
    (A, B) in full (stored shapes and dtypes), for the offsets and the init record. A collective: every rank calls it
    with the same `layers` in the same order; a bad target raises on every rank before any communication.
    `LowRankGradient`s (identical on every rank) are turned into A, B by every rank itself, without broadcasts."""
    from .layout import factor_params
    from .model import check_factors, compute_factors, stored_dtype, write_factors

    dist = _dist()
    weights = {key: layer.get_base_layer().weight for key, layer in layers}
    check_parallel_setup(None, [*weights.values(), *grads.values()])
    if not process_group_ready():
        raise RuntimeError("These LoRA-GA gradients were estimated across processes (reduce_to='owner' or an FSDP2 "
                           "model): initialise in every process of that torch.distributed process group, with it "
                           f"still initialised; see {GUIDE}.")
    for key, layer in layers:  # same checks, same answer, on every rank
        grad = grads.get(normalize_name(key))
        shape = tuple(grad.shape) if grad is not None else tuple(grads.shapes[normalize_name(key)])
        if is_dtensor(grad) and not is_dtensor(weights[key]):  # e.g. a root FSDP2 module left unsharded
            raise ValueError(f"The gradient for {key!r} is sharded (a DTensor) but its weight is not: estimate on the "
                             "model you initialise, sharded the same way, and call model.reshard() on the FSDP2 "
                             "root before initialising.")
        check_factors(layer, adapter_name, shape, options, name=key)
    group = _group_of(list(weights.values()))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sharded = [local(w).device for w in weights.values() if is_dtensor(w)]
    device = sharded[0] if sharded else comm_device(group)
    by_key, results = dict(layers), {}
    # low-rank gradients (`estimate_gradient(low_rank=k)`) are the same small U, S, Vh on every rank: each rank
    # computes their A, B itself, no broadcast (unless the init needs the full W or draws random directions)
    results.update(_factors_everywhere(by_key, adapter_name, grads, options, group, device))
    given = getattr(grads, "owners", {})
    owners = {key: given[normalize_name(key)] for key, _ in layers if normalize_name(key) in given}
    owners.update(assign_owners({key: weights[key].numel() for key, _ in layers if key not in owners}, world))
    owners = {key: owner for key, owner in owners.items() if key not in results}
    queues = [[key for key in sorted(owners, key=lambda k: -weights[k].numel()) if owners[key] == j]
              for j in range(world)]
    for round_keys in _rounds(queues):
        mine, error, pair = None, None, None
        for key in round_keys:  # gathers: every rank, same order
            grad, owner = grads.get(normalize_name(key)), owners[key]
            full = gather_to(grad, owner) if is_dtensor(grad) else grad
            full_w = gather_to(weights[key], owner) if options.scale == "weightS" and is_dtensor(weights[key]) else None
            if rank == owner:
                mine = (key, full, full_w)
        if mine is not None:
            try:
                pair = compute_factors(by_key[mine[0]], adapter_name, mine[1], options, name=mine[0], weight=mine[2])
            except Exception as exc:  # noqa: BLE001 (re-raised by _agree, on this rank)
                error = exc
        mine = full = full_w = None
        _agree(error, f"computing the LoRA-GA factors of {round_keys}", group, device)
        for key in round_keys:
            params = factor_params(by_key[key], adapter_name)
            results[key] = _broadcast_pair(pair if owners[key] == rank else None, [p.shape for p in params],
                                           [stored_dtype(p, options) for p in params], owners[key], group, device)
    for key, (A, B) in results.items():
        write_factors(by_key[key], adapter_name, A, B)
    return results


def _factors_everywhere(by_key: dict, adapter_name: str, grads, options, group, device) -> dict:
    """key -> (A, B) for the targets every rank computes alike (`_same_on_every_rank`); raises on every rank if any
    rank failed."""
    from .model import compute_factors

    keys = [key for key in by_key if _same_on_every_rank(grads.get(normalize_name(key)), options)]
    if not keys:  # the same answer on every rank (a rank's gradient types do not depend on the rank)
        return {}
    out, error = {}, None
    try:
        for key in keys:
            out[key] = compute_factors(by_key[key], adapter_name, grads[normalize_name(key)], options, name=key)
    except Exception as exc:  # noqa: BLE001 (re-raised by _agree, on this rank)
        error = exc
    _agree(error, "computing the LoRA-GA factors of the low-rank gradients", group, device)
    return out


def _same_on_every_rank(grad, options) -> bool:
    """A, B of this gradient can be computed on every rank alike: a `LowRankGradient` (every rank holds the same
    all-reduced factors), neither scale="weightS" (needs the full W) nor direction="random" (each rank's RNG)."""
    from .sketch import LowRankGradient

    return isinstance(grad, LowRankGradient) and options.scale != "weightS" and options.direction != "random"


def _rounds(queues: list[list[str]]) -> Iterable[list[str]]:
    """Round k: the k-th target of each rank's queue."""
    for k in range(max((len(q) for q in queues), default=0)):
        yield [q[k] for q in queues if k < len(q)]
