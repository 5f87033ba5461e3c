"""LoRA-GA's gradient estimation (Wang, Yu, Li 2024, arXiv 2407.05000), re-exported with the context, the two saves
and the estimation dataloader by `peft.utils.lora_ga_utils` (the seed's import path):

    named_grad = estimate_gradient(model=model, dataloader=dataloader, accelerator=accelerator, quant_flag=False)
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=LoraGAConfig(...), adapter_name="default")
    save_loraga_model_init(model, save_dir=save_dir)
    ... train ...
    save_loraga_model_final(model, save_dir=save_dir)   # a plain rank-2r LoRA for the ORIGINAL base weights

With transformers' Trainer (or TRL's): `Trainer(model=get_peft_model(model, LoraGAConfig(...)), ...,
callbacks=[LoraGACallback()])` estimates and initialises at the start of training (docs/loraga.md).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .context import LoraGAContext, normalize_name, unwrap_model
from .data import estimation_batches, estimation_dataloader
from .distributed import (
    OwnedGradients,
    check_parallel_setup,
    is_dtensor,
    local,
    reduce_to_owners,
    reshard,
)
from .offload import block_offload
from .saving import INIT_SUBFOLDER, save_loraga_model_final, save_loraga_model_init
from .sketch import LowRankGradient, estimate_low_rank

__all__ = [
    "INIT_SUBFOLDER",
    "LoraGACallback",  # noqa: F822 (module __getattr__ below: imports transformers on first use)
    "LoraGAContext",
    "LowRankGradient",
    "OwnedGradients",
    "estimate_gradient",
    "estimation_batches",
    "estimation_dataloader",
    "save_loraga_model_final",
    "save_loraga_model_init",
    "supported_weight_modules",
]

_MACHINERY = ("original_module", "modules_to_save")


def __getattr__(name: str):
    """`LoraGACallback` (the Trainer flow) needs transformers: imported on first use."""
    if name == "LoraGACallback":
        from .callback import LoraGACallback

        return LoraGACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _supported(module: nn.Module) -> bool:
    """Layers LoRA can wrap: float nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv2d (groups=1)."""
    if isinstance(module, nn.Embedding):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        weight = getattr(module, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point
    return False


def _resolve_config(model: nn.Module, peft_config):
    """A copy of `peft_config` with `target_modules` filled in the way LoraModel does it (defaults, all-linear)."""
    from ..lora.model import prepare_lora_config
    from ..tuners_utils import BaseTuner

    return prepare_lora_config(model, copy.deepcopy(peft_config), BaseTuner.get_model_config(model))


def supported_weight_modules(model: nn.Module, peft_config=None, quantized: bool = False) -> dict[str, nn.Module]:
    """Normalized module name -> module, for every layer whose weight LoRA can adapt (or only `peft_config`'s
    targets). Adapter layers (`lora_*`, `modules_to_save` copies) never count; a wrapped layer counts once.
    `quantized=True` also counts bitsandbytes Linear4bit / Linear8bitLt layers (the `low_rank` estimation)."""
    from ..target_matching import is_target
    from .quant import is_quantized

    plain = unwrap_model(model)
    config = _resolve_config(plain, peft_config) if peft_config is not None else None
    found: dict[str, nn.Module] = {}
    for name, module in plain.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") or p in _MACHINERY for p in parts) or not (
                _supported(module) or (quantized and is_quantized(module))):
            continue
        key = normalize_name(name)
        if config is not None and not is_target(config, key):
            continue
        found[key] = module
    if config is not None and getattr(config, "target_parameters", None):  # bare parameters (fused MoE experts)
        from ..lora.param_wrapper import target_parameter_stand_ins

        found.update(target_parameter_stand_ins(plain, config))
    return found


def _loss_of(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError("The model returned no scalar loss for an estimation batch; include `labels` in the "
                         "batches (or make the model return the loss).")
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _Accumulator:
    """fp32 running sums of the weight gradients, filled by post-accumulate-grad hooks (each `.grad` is consumed
    and cleared right away, so at most one batch's gradient of a weight exists at a time)."""

    def __init__(self, modules: dict[str, nn.Module], on_cpu: bool) -> None:
        self.params: dict[int, nn.Parameter] = {}
        self.names: dict[int, list[str]] = {}
        for name, module in modules.items():
            self.params[id(module.weight)] = module.weight
            self.names.setdefault(id(module.weight), []).append(name)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.on_cpu = on_cpu

    def hook(self, param: torch.Tensor) -> None:
        # an FSDP2-sharded weight's gradient is a DTensor (this rank's shard, averaged over the ranks): sum its shard
        source = local(param.grad.detach())
        # to the CPU in the gradient's own dtype (half the bytes of fp32 for bf16), summed there in fp32
        grad = source.to("cpu") if self.on_cpu else source
        key = id(param)
        if key in self.sums:
            self.sums[key].add_(grad)  # in-place add promotes a bf16 gradient to the fp32 sum's precision
        else:  # keep the first (fp32) gradient itself, no copy, unless it views a shared buffer (DDP bucket views,
            first = grad.to(torch.float32)  # FSDP2's reduce-scatter output)
            shared = source._is_view() and first.data_ptr() == source.data_ptr()
            self.sums[key] = first.clone() if shared else first
        self.counts[key] = self.counts.get(key, 0) + 1
        param.grad = None

    def nbytes(self) -> int:
        """Bytes of the running sums held by this process (this rank's shards under FSDP2)."""
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def result(self, count: Optional[int] = None) -> dict[str, torch.Tensor]:
        """name -> sum / count (default: per weight, the number of backward passes that reached it); call once.
        A sharded weight's entry is a DTensor of the weight's layout around this rank's shard of the sum."""
        out = {}
        for key, param in self.params.items():
            total = self.sums.get(key)
            if total is None:
                total = torch.zeros(local(param).shape, dtype=torch.float32,
                                    device="cpu" if self.on_cpu else local(param).device)
            divisor = count if count is not None else self.counts.get(key, 1)
            total.div_(max(divisor, 1))  # in place: the sums are not used afterwards
            if is_dtensor(param):
                from torch.distributed.tensor import DTensor

                total = DTensor.from_local(total, param.device_mesh, param.placements, run_check=False,
                                           shape=param.shape, stride=param.stride())
            for name in self.names[key]:
                out[name] = total
        return out


def _all_reduce_mean(named: dict[str, torch.Tensor], count: int, device: Optional[torch.device]) -> dict:
    """Average over processes, weighting each by its number of batches (= one process on all batches)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return named
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    out = {}
    for name in sorted(named):
        summed = (named[name] * count).to(device)
        dist.all_reduce(summed)
        out[name] = (summed / total.item()).to(named[name].device)
    return out


def estimate_gradient(
    model: nn.Module, dataloader: Iterable, accelerator=None, quant_flag: bool = False, origin_type: str = "bf16",
    quant_type: str = "nf4", no_split_module_classes: Optional[Sequence[str]] = None, peft_config=None,
    iters: Optional[int] = None, reduce_to: str = "all", low_rank: Optional[int] = None, passes: int = 5,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Module name -> average over the batches of `dL/dW` for that module's weight (shaped like the stored weight,
    fp32, on the CPU): the `G` of LoRA-GA (arXiv 2407.05000, eq. 8). Runs forward+backward on at most `iters`
    batches (default: `peft_config.iters` if given, else all), in train mode, with gradients on the adaptable
    weights only (every supported layer, or the targets of `peft_config`), and averages across processes,
    weighting each by its number of batches. `requires_grad`, train/eval modes, existing `.grad`s and hooks are
    restored on exit.

    Several processes (docs/loraga.md, "Large models: several GPUs"): `reduce_to="all"` all-reduces the means, every
    process gets every one; `reduce_to="owner"` reduces each to the one process that will run its SVD and returns
    an `OwnedGradients` holding this process's share only. A weight sharded by FSDP2's `fully_shard` gets a DTensor
    entry (fp32, the weight's layout, on its device): each process sums its own shard of the gradient FSDP has
    averaged, nothing is gathered (every process must run the same number of batches, as for any FSDP step).

    `quant_flag=True` runs the float model block by block with CPU offload (see `peft.tuners.loraga.offload`):
    same gradients, an accelerator footprint of one chunk of blocks plus activations.

    `low_rank=k` (issue 14): never forms an m x n gradient; returns name -> `LowRankGradient` (`U S Vh ~ G`, the
    same mean, in the stored weight's layout, `to_dense()` gives the tensor the exact path returns) from a streamed
    randomized range finder on the targets' inputs X and output gradients delta (`peft.tuners.loraga.sketch`).
    No parameter requires grad meanwhile; per target only k(m + n) numbers are held. `passes` forward+backward
    passes over the batches: pass 1 sums `Y = G Omega = sum delta^T (X Omega)` (Omega: n x k Gaussian from
    `torch.Generator().manual_seed(seed)`, the same on every rank), pass 2 `Z = G^T Q = sum X^T (delta Q)` with
    `Q = orth(Y)`, then `G ~ Q Z^T` and the SVD of a k x k matrix; each extra pass is one more product with G
    or G^T on the re-orthonormalised last result (a power iteration every two passes; more accurate when the
    spectrum decays slowly). The left singular vectors (B's directions) improve at odd passes (3: from
    `G G^T G Omega`, 5: `(G G^T)^2 G Omega`), the right ones at even passes. Default 5 (docs/loraga.md, "Exact or
    sketch": the measured choice for >= 0.95 of the exact top-2r energy on every target at k >= 4r; passes=3
    with k = 8r is the cheaper alternative). Exact when k >= rank(G). The batches of the first pass are cached
    (at most `iters` of them) and replayed, so a generator works and every pass sees the same batches. Each
    pass's sums are all-reduced across processes (weighted by their numbers of batches), so every rank gets the
    same factors: the same under DDP and FSDP2 (the hooks see whole activations; nothing weight-sized is
    gathered), and `reduce_to` makes no difference (k(m + n) numbers per target; "owner" returns the same plain
    dict as "all"). Gradient checkpointing (reentrant or not) gives the same sketch: each batch adds once.
    Supported targets: Linear (also bitsandbytes 4-bit / 8-bit bases, without `quant_flag`), Conv1D, Embedding;
    a targeted Conv2d is refused. LoRA-GA needs k >= 2r (checked at the init)."""
    from tqdm.auto import tqdm

    if iters is None and peft_config is not None:
        iters = getattr(peft_config, "iters", None)
    if iters is not None and (not isinstance(iters, int) or iters <= 0):
        raise ValueError(f"Invalid iters={iters!r}: expected a positive int or None.")
    if reduce_to not in ("all", "owner"):
        raise ValueError(f"Invalid reduce_to={reduce_to!r}: expected 'all' or 'owner'.")
    check_parallel_setup(model, ())  # FSDP1, before unwrapping hides it
    runner = accelerator.unwrap_model(model) if accelerator is not None else model
    if isinstance(runner, nn.parallel.DistributedDataParallel):  # its reducer expects every weight's gradient:
        runner = runner.module  # run the module itself; the mean is all-reduced once, below
    plain = unwrap_model(runner)
    if low_rank is not None:
        return _low_rank_branch(runner, plain, dataloader, accelerator, quant_flag, peft_config, iters, low_rank,
                                passes, seed)
    reshard(runner)  # FSDP2: hook the sharded weights, not the unsharded ones a forward pass may have left
    modules = supported_weight_modules(plain, peft_config)
    if not modules:
        raise ValueError("No layer to estimate gradients for: the model has no Linear/Conv1D/Embedding/Conv2d "
                         "weight" + (" matching peft_config's targets." if peft_config is not None else "."))
    check_parallel_setup(plain, [m.weight for m in modules.values()])
    if quant_flag and any(is_dtensor(m.weight) for m in modules.values()):
        raise ValueError("quant_flag=True (block offload) does not apply to an FSDP2-sharded model: each process "
                         "already holds only its shard; use quant_flag=False.")
    device = _exec_device(plain, accelerator, quant_flag)
    main = accelerator.is_main_process if accelerator is not None else _rank() == 0
    count = 0
    offload = block_offload(plain, device, no_split_module_classes, origin_type, quant_type) if quant_flag \
        else contextlib.nullcontext()
    with capture_gradients(plain, modules, on_cpu=quant_flag) as acc, offload:
        batches = itertools.islice(dataloader, iters) if iters is not None else dataloader
        total = iters if iters is not None else _len_or_none(dataloader)
        for batch in tqdm(batches, total=total, desc="Estimating gradients (LoRA-GA)", disable=not main):
            loss = _loss_of(runner, _to_device(batch, device))
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            count += 1
    if count == 0:
        raise ValueError("The estimation dataloader yielded no batch; LoRA-GA needs at least one.")
    silent = [n for n in modules if acc.sums.get(id(modules[n].weight)) is None]
    if silent:
        warnings.warn(f"No gradient reached {silent[:5]}{' ...' if len(silent) > 5 else ''}; their entries are zero.")
    return _across_processes(acc, count, reduce_to, getattr(accelerator, "device", None))


def _low_rank_branch(runner, plain, dataloader, accelerator, unsupported: bool, peft_config, iters, low_rank,
                     passes, seed) -> dict[str, LowRankGradient]:
    """`estimate_gradient(low_rank=k)`: the streamed range finder of `peft.tuners.loraga.sketch`."""
    if unsupported:
        raise ValueError("low_rank=... does not use quant_flag=True (it runs on quantized bases directly, without "
                         "offload): leave quant_flag=False.")
    if peft_config is not None and getattr(peft_config, "target_parameters", None):
        raise ValueError(f"low_rank={low_rank} (the sketch of a layer's inputs and output gradients) does not cover "
                         f"target_parameters={list(peft_config.target_parameters)}: estimate with low_rank=None.")
    modules = supported_weight_modules(plain, peft_config, quantized=True)
    if not modules:
        raise ValueError("No layer to estimate gradients for: the model has no target Linear/Conv1D/Embedding.")
    return estimate_low_rank(runner, plain, modules, dataloader, low_rank, passes, seed, iters,
                             _exec_device(plain, accelerator), accelerator, _loss_of, _to_device,
                             _freeze_all_but, _restore, getattr(accelerator, "device", None))


def _across_processes(acc: "_Accumulator", count: int, reduce_to: str, device: Optional[torch.device]) -> dict:
    """The accumulator's means over all processes' batches: FSDP2 shards as they are (FSDP averaged them already);
    the others all-reduced (`reduce_to="all"`, CPU tensors) or reduced onto their owners (`"owner"`)."""
    named = acc.result(count)
    acc.sums.clear()  # `named` holds the only reference: a reduction frees what this process does not keep
    sharded = {name: grad for name, grad in named.items() if is_dtensor(grad)}
    replicated = {name: grad for name, grad in named.items() if not is_dtensor(grad)}
    del named
    if reduce_to == "owner" and _world_size() > 1:
        owned = reduce_to_owners(replicated, count)
        owned.update(sharded)
        return owned
    replicated = _all_reduce_mean(replicated, count, device)
    return {**{name: grad.cpu() for name, grad in replicated.items()}, **sharded}


@contextlib.contextmanager
def capture_gradients(model: nn.Module, modules: dict[str, nn.Module], on_cpu: bool = False):
    """Inside: only the weights of `modules` require grad, the model is in train mode, and every backward pass
    adds those weights' gradients (fp32) to the yielded `_Accumulator` instead of `.grad`. On exit (also on error)
    `requires_grad`, `.grad`, train/eval flags and hooks are as before."""
    acc = _Accumulator(modules, on_cpu=on_cpu)
    state = _freeze_all_but(model, acc.params)
    handles = [p.register_post_accumulate_grad_hook(acc.hook) for p in acc.params.values()]
    try:
        model.train()
        with torch.enable_grad():
            yield acc
    finally:
        for handle in handles:
            handle.remove()
        _restore(model, state)


def _len_or_none(obj) -> Optional[int]:
    try:
        return len(obj)
    except TypeError:
        return None


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _exec_device(model: nn.Module, accelerator, offload: bool = False) -> torch.device:
    """accelerator.device; else, for the offload path, CUDA when present (the model itself waits on the CPU);
    else the device of the model's first parameter."""
    if accelerator is not None:
        return accelerator.device
    if offload and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _freeze_all_but(model: nn.Module, keep: dict[int, nn.Parameter]) -> dict:
    """Snapshot of requires_grad, .grad and train flags; then only the weights in `keep` require grad."""
    params = list(model.parameters())
    state = {
        "requires_grad": [(p, p.requires_grad) for p in params],
        "grad": [(p, p.grad) for p in params],
        "training": [(m, m.training) for m in model.modules()],
    }
    for p in params:
        p.grad = None
        p.requires_grad_(id(p) in keep)
    return state


def _restore(model: nn.Module, state: dict) -> None:
    for p, flag in state["requires_grad"]:
        p.requires_grad_(flag)
    for p, grad in state["grad"]:
        p.grad = grad
    for m, flag in state["training"]:
        m.training = flag
