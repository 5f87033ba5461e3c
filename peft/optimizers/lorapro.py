"""`LoraProAdamW`: AdamW with LoRA-Pro's adjusted gradients, a `torch.optim.Optimizer` built from a LoRA model or its
parameters (`hook.register_lorapro_adjustment` gives any torch optimizer the adjustment; `seed.AdamWLoRAPro` is the
seed API).

The adjustment happens inside `step()`, so it runs once per optimizer step: after gradient accumulation, after DDP
has averaged the gradients and after gradient clipping. Several processes: DDP as is; DDP with the state partitioned
across the ranks (`shard_moments=True`, `zero.py`); FSDP2, whose DTensor factors are found and stepped as row shards
(`sharding.py`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from ..tuners.lorapro import math as lp
from ..tuners.lorapro.config import MODES, validate_options
from . import zero
from .batches import MOMENTS as _MOMENTS
from .batches import gather, grad_of, grams, make_batches, step_batch
from .nonfinite import all_finite, nonfinite_error, validate_nonfinite
from .pairs import LoraProPair, lorapro_pairs, pairs_in_groups, refuse_expert_stacks, warn_if_dropout
from .sharding import agree_finite, is_sharded, local, new_state, pair_shards, refuse_fsdp1


def _validate_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    def bad(name: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"Invalid {name}={value!r}: expected {expected}.")

    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise bad("lr", lr, "a finite number >= 0")
    in_range = isinstance(betas, (tuple, list)) and len(betas) == 2
    if not (in_range and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise bad("betas", betas, "a pair of numbers in [0, 1)")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise bad("eps", eps, "a finite number >= 0")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise bad("weight_decay", weight_decay, "a finite number >= 0")


def _hyper(group: dict, lr_scale: float) -> lp.AdamHyper:
    beta1, beta2 = group["betas"]
    return lp.AdamHyper(group["lr"] * lr_scale, beta1, beta2, group["eps"], group["weight_decay"])


_grad = grad_of  # `hook.py` imports it from here


class LoraProAdamW(Optimizer):
    """AdamW with LoRA-Pro's adjusted gradients for the A/B factors of a LoRA model.

    Args:
        model: the model (a `PeftModel` from `get_peft_model(model, LoraProConfig(...))` or `LoraConfig(...)`, or any
            module holding LoRA layers), or its parameters / param groups, as torch optimizers take them (what
            transformers' `Trainer(optimizer_cls_and_kwargs=(LoraProAdamW, {...}))` passes: a decay and a no-decay
            group, each with its own `weight_decay`). Either way A and B are paired by the LoRA layers that own
            them, never by their position; a pair's A and B must be in the same group.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (defaults for the groups); weight decay is decoupled
            (`p <- p - lr wd p`) on A, B and on every other trainable parameter.
        mode, x_mode, damping: override the adapters' options (None: each adapter's `LoraProConfig` options; on the
            layers of a plain `LoraConfig` model, `LoraProConfig`'s defaults "full", "sylvester", 1e-8).
        nonfinite: what a NaN or inf gradient does (checked before anything changes, one fused reduction per step):
            "raise" (default) a FloatingPointError naming the parameter, parameters and state untouched; "skip" the
            whole step, as a GradScaler does, counted in `skipped_steps` (saved in `state_dict()`).
        shard_moments: with DDP (whole parameters on every rank), partition the optimizer state across the ranks of
            the default process group: each rank steps the pairs (and other parameters) it owns, balanced by state
            size, and broadcasts their new values (`zero.py`). Needs an initialised process group.

    Building it on layers with `lora_dropout > 0` warns once (see docs/lorapro.md, "LoRA dropout").

    Every trainable parameter that is not a LoRA-Pro factor (a classifier head, biases) is updated as plain AdamW
    in the same optimizer. Moments are fp32 (fp64 for fp64 parameters), created at the first step,
    and round-trip through `state_dict()` / `load_state_dict()`. Modes (per pair):

    - "full": the paper's Algorithm 2: Adam moments of the equivalent gradient `g~` in the (m, n) space, the Adam
      direction U is treated as the full gradient and adjusted (`lp.full_mode_step`); state on A: `exp_avg`,
      `exp_avg_sq` of shape (m, n).
    - "efficient": adjust the gradients, then AdamW on each factor (`lp.efficient_mode_step`): LoRA's memory.

    FSDP2 (`fully_shard`) needs nothing: DTensor factors are found and stepped as row shards, the state (full
    mode's (m, n) moments included) is a DTensor sharded like B's rows (`sharding.py`); build the optimizer after
    `fully_shard`, or let accelerate swap its parameters. FSDP1 (`FullyShardedDataParallel`) is refused.
    """

    def __init__(
        self, model: Union[nn.Module, Iterable[torch.Tensor], Iterable[dict]], lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
        mode: Optional[str] = None, x_mode: Optional[str] = None, damping: Optional[float] = None,
        nonfinite: str = "raise", shard_moments: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode, x_mode=x_mode,
                        damping=damping)
        if not isinstance(model, nn.Module):
            self._setup_groups(model, defaults, nonfinite, shard_moments)
            return
        refuse_fsdp1(model)
        pairs = lorapro_pairs(model)
        factor_ids = {id(p) for pair in pairs for p in (pair.A, pair.B)}
        others, seen = [], set()
        for param in model.parameters():
            if param.requires_grad and id(param) not in factor_ids and id(param) not in seen:
                seen.add(id(param))
                others.append(param)
        self._setup(pairs, others, defaults, nonfinite, shard_moments)

    def _setup(self, pairs: list[LoraProPair], others: list[torch.Tensor], defaults: dict, nonfinite: str,
               shard_moments: bool = False) -> None:
        _validate_hyper(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        _validate_overrides(defaults["mode"], defaults["x_mode"], defaults["damping"])
        validate_nonfinite(nonfinite)
        groups = [{"params": [p for pair in pairs for p in (pair.A, pair.B)], "lorapro": True}]
        if others:
            groups.append({"params": others, "lorapro": False})
        super().__init__(groups, defaults)
        self._finish(pairs, nonfinite, shard_moments)

    def _setup_groups(self, params: Union[Iterable[torch.Tensor], Iterable[dict]], defaults: dict,
                      nonfinite: str, shard_moments: bool) -> None:
        """The optimizer over `params` (tensors or param groups, kept as given); pairs from the owning layers."""
        _validate_hyper(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        _validate_overrides(defaults["mode"], defaults["x_mode"], defaults["damping"])
        validate_nonfinite(nonfinite)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            _validate_overrides(group["mode"], group["x_mode"], group["damping"])
        refuse_fsdp1(params=self._params())
        self._finish(pairs_in_groups(self.param_groups), nonfinite, shard_moments)

    def _finish(self, pairs: list[LoraProPair], nonfinite: str, shard_moments: bool) -> None:
        refuse_expert_stacks(pairs)
        self._pairs = pairs
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        self._partition = self._build_partition() if shard_moments else None
        warn_if_dropout(pairs, stacklevel=4)  # _finish <- _setup* <- __init__ <- the user

    def _build_partition(self) -> zero.Partition:
        """Owners of the pairs and other parameters (`zero.py`), weighed by their state size in their mode."""
        if any(is_sharded(p) for p in self._params()):
            raise ValueError("shard_moments=True partitions the state of whole parameters (DDP); these parameters are "
                             "DTensors (FSDP2), whose state is sharded with them already: leave shard_moments=False.")
        group_of = self._group_of()
        factors, units = set(), []
        for pair in self._pairs:
            (r, n), m = pair.A.flatten(1).shape, pair.B.shape[0]
            full = self._options(pair, group_of[id(pair.A)])[0] == "full"
            units.append(((pair.A, pair.B), m * n if full else r * (m + n)))
            factors.update((id(pair.A), id(pair.B)))
        units += [((p,), p.numel()) for p in self._params() if p.requires_grad and id(p) not in factors]
        return zero.build_partition(units)

    @property
    def pairs(self) -> list[LoraProPair]:
        """The (layer, adapter, A, B) pairs this optimizer adjusts."""
        return list(self._live_pairs())

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_of(self) -> dict[int, dict]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def _live_pairs(self) -> list[LoraProPair]:
        """The pairs with the factors their layers hold now (`LoraProPair.current`): after `fully_shard` and
        accelerate's swap of the optimizer's parameters, the new DTensor parameters."""
        fresh = [pair.current() for pair in self._pairs]
        if any(new is not old for new, old in zip(fresh, self._pairs)):
            known = {id(p) for p in self._params()}
            for pair in fresh:
                if id(pair.A) not in known or id(pair.B) not in known:
                    raise ValueError(
                        f"The factors of {pair.describe()} were replaced after the optimizer was built (e.g. by "
                        "fully_shard) and the optimizer does not hold the new ones: build the optimizer after "
                        "fully_shard(model) (accelerate and transformers' Trainer swap its parameters themselves).")
            self._pairs = fresh
        return self._pairs

    def _lr_scale(self, step: int, group: dict) -> float:
        """Multiplier of the group's lr at `step` (1-based); 1 here, a schedule in `AdamWLoRAPro`."""
        return 1.0

    def _options(self, pair: LoraProPair, group: dict) -> tuple[str, str, float]:
        opts = pair.options
        return (opts.mode if group["mode"] is None else group["mode"],
                opts.x_mode if group["x_mode"] is None else group["x_mode"],
                opts.damping if group["damping"] is None else group["damping"])

    def _owns(self, param: torch.Tensor) -> bool:
        return self._partition is None or self._partition.owns(param)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimizer step: every pair with a gradient (LoRA-Pro), then the other parameters (AdamW).

        Pairs of one shape, dtype, options, scale, step count and param group are stepped together as a stack
        (`batches.py`). With `shard_moments`, this rank steps the units it owns, then every rank broadcasts its own."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs, group_of = self._live_pairs(), self._group_of()
        if pairs and not any(id(pair.A) in group_of for pair in pairs):
            raise ValueError(
                "None of the LoRA factors this optimizer pairs is among its param_groups any more: something replaced "
                "them (DeepSpeed ZeRO steps flat fp32 partitions of the parameters, which LoRA-Pro cannot pair; it "
                "would train plain AdamW). Use DDP or FSDP2 for LoRA-Pro (docs/multi_gpu.md).")
        todo = [p for p in pairs if (p.A.grad is not None or p.B.grad is not None) and self._owns(p.A)]
        factors = {id(p) for pair in pairs for p in (pair.A, pair.B)}
        others = [(param, group) for group in self.param_groups for param in group["params"]  # groups added later
                  if param.grad is not None and id(param) not in factors]  # (add_param_group) too: plain AdamW
        # nothing has changed yet: refuse (or skip) a step with a NaN/inf gradient, on every rank alike
        if not self._grads_finite(pairs, others):
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                return loss
            raise nonfinite_error(self._named_grads())
        batches = make_batches(todo, group_of, self._options, lambda A: self.state.get(A, {}).get("step", 0))
        gather(batches)  # FSDP2: A and gA whole
        # every batch's Gram matrices decomposed together (one batched eigh per rank/device, not two per pair)
        for batch, g in zip(batches, grams(batches)):
            step_batch(batch, g, _hyper(batch.group, self._lr_scale(batch.step + 1, batch.group)), self._moments)
        for param, group in others:
            if self._owns(param):
                self._step_plain(param, group)
        if self._partition is not None:
            self._partition.broadcast()
        return loss

    def _grads_finite(self, pairs: list[LoraProPair], others: list) -> bool:
        """Whether every gradient is finite on every rank: each rank checks its own (FSDP2: its shards; DDP: all,
        the same on every rank), and the ranks of sharded pairs agree (one all-reduce)."""
        grads = [local(p.grad) for pair in pairs for p in (pair.A, pair.B) if p.grad is not None]
        finite = all_finite(grads + [local(param.grad) for param, _ in others])
        groups, device = {}, None
        for pair in pairs:
            shards = pair_shards(pair.A, pair.B, pair.describe)
            if shards is not None:
                groups[id(shards.group)], device = shards.group, local(pair.A).device
        for param, _ in others:  # e.g. a head under FSDP2
            if is_sharded(param):
                mesh, device = param.device_mesh, local(param).device
                groups.update((id(g), g) for g in (mesh.get_group(d) for d in range(mesh.ndim)))
        return agree_finite(finite, groups.values(), device)

    def _named_grads(self) -> list[tuple[str, torch.Tensor]]:
        """(how an error names it, gradient) of every parameter with a gradient."""
        names = {id(p): f"{role} of {pair.describe()}" for pair in self._pairs for role, p in (("A", pair.A),
                                                                                               ("B", pair.B))}
        return [(names.get(id(p), f"parameter #{i} of param group #{j} (shape {tuple(p.shape)})"), local(p.grad))
                for j, g in enumerate(self.param_groups) for i, p in enumerate(g["params"]) if p.grad is not None]

    def _moments(self, param: torch.Tensor, shape: Optional[torch.Size], dtype: torch.dtype,
                 mode: str = "adamw") -> dict:
        """The state of `param`, created at its first step: `step` and fp32 (fp64) moments of `shape` (global: a
        DTensor sharded like the parameter's rows under FSDP2); `shape=None`: `step` only (B in full mode under
        FSDP2, for torch.distributed.checkpoint, which wants an entry for every trainable parameter)."""
        state = self.state[param]
        if shape is None:
            state.setdefault("step", 0)
        elif not state:
            state["step"] = 0
            for key in _MOMENTS:
                state[key] = new_state(param, shape, dtype)
        elif state["exp_avg"].shape != shape:
            raise ValueError(
                f"Invalid optimizer state for a parameter of shape {tuple(param.shape)}: exp_avg has shape "
                f"{tuple(state['exp_avg'].shape)}, expected {tuple(shape)} for mode {mode!r} (full mode keeps (m, n) "
                "moments, efficient mode (r, n) and (m, r)). Was the state saved with the other mode?"
            )
        return state

    def _step_plain(self, param: torch.Tensor, group: dict) -> None:
        state = self._moments(param, param.shape, lp.compute_dtype(param))
        state["step"] += 1
        hp = _hyper(group, self._lr_scale(state["step"], group))
        p = local(param)
        direction = lp.adam_direction(local(state["exp_avg"]), local(state["exp_avg_sq"]), grad_of(param),
                                      state["step"], hp)
        p.copy_(lp.decoupled_update(p, direction, hp))

    def state_dict(self) -> dict:
        """As `Optimizer.state_dict`, plus `skipped_steps` (steps skipped for non-finite gradients) and, with
        `shard_moments`, the partition (`zero.py`: this rank's state only)."""
        out = {**super().state_dict(), "skipped_steps": self.skipped_steps}
        return out if self._partition is None else zero.record(out, self._partition, self._params())

    def load_state_dict(self, state_dict: dict) -> None:
        """As `Optimizer.load_state_dict`, but the moments keep their fp32 (fp64) dtype: torch would cast them to
        the parameter's dtype (bf16 moments cannot represent v's decay). Restores `skipped_steps` (0 if absent).
        With `shard_moments`: a state saved by this rank with the same partition, or an unsharded one (this rank
        keeps its units' entries); anything else is a ValueError (`zero.check_loadable`)."""
        zero.check_loadable(state_dict, self._partition, self._params())
        saved = state_dict["state"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != zero.KEY})
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        # the saved groups' parameter keys (indices; names from torch.distributed.checkpoint) in order -> parameters
        param_of = dict(zip((k for g in state_dict["param_groups"] for k in g["params"]), self._params()))
        for index, entry in saved.items():
            param = param_of[index]
            for key in _MOMENTS:
                if key in entry:
                    self.state[param][key] = entry[key].to(device=param.device, dtype=lp.compute_dtype(entry[key]),
                                                           copy=True)
        if self._partition is not None:
            zero.drop_unowned(self.state, self._partition)


def _validate_overrides(mode: Optional[str], x_mode: Optional[str], damping: Optional[float]) -> None:
    validate_options(mode if mode is not None else MODES[0], x_mode if x_mode is not None else lp.X_MODES[0],
                     damping if damping is not None else 0.0)
