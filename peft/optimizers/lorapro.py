"""`LoraProAdamW`: AdamW with LoRA-Pro's adjusted gradients, a `torch.optim.Optimizer` built from a LoRA model or its
parameters (`hook.register_lorapro_adjustment` gives any torch optimizer the adjustment; `seed.AdamWLoRAPro` is the
seed API).

The adjustment happens inside `step()`, so it runs once per optimizer step: after gradient accumulation, after DDP
has averaged the gradients and after gradient clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from ..tuners.lorapro import math as lp
from ..tuners.lorapro.config import MODES, validate_options
from .nonfinite import all_finite, nonfinite_error, validate_nonfinite
from .pairs import LoraProPair, lorapro_pairs, pairs_in_groups, warn_if_dropout

_MOMENTS = ("exp_avg", "exp_avg_sq")


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


@dataclass
class _Batch:
    """k pairs that step together: one shape, dtype, mode, x_mode, damping, scale s, step count (before this step)
    and param group. A (k, r, n), B (k, m, r) and their gradients gA, gB alike: the pairs' factors, stacked."""

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


def _hyper(group: dict, lr_scale: float) -> lp.AdamHyper:
    beta1, beta2 = group["betas"]
    return lp.AdamHyper(group["lr"] * lr_scale, beta1, beta2, group["eps"], group["weight_decay"])


def _grad(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:
        return torch.zeros_like(param)
    if param.grad.is_sparse:
        raise ValueError("LoRA-Pro optimizers do not support sparse gradients.")
    return param.grad


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

    Building it on layers with `lora_dropout > 0` warns once (see docs/lorapro.md, "LoRA dropout").

    Every trainable parameter that is not a LoRA-Pro factor (a classifier head, biases) is updated as plain AdamW
    in the same optimizer. Moments are fp32 (fp64 for fp64 parameters), created at the first step,
    and round-trip through `state_dict()` / `load_state_dict()`. Modes (per pair):

    - "full": the paper's Algorithm 2: Adam moments of the equivalent gradient `g~` in the (m, n) space, the Adam
      direction U is treated as the full gradient and adjusted (`lp.full_mode_step`); state on A: `exp_avg`,
      `exp_avg_sq` of shape (m, n).
    - "efficient": adjust the gradients, then AdamW on each factor (`lp.efficient_mode_step`): LoRA's memory.
    """

    def __init__(
        self, model: Union[nn.Module, Iterable[torch.Tensor], Iterable[dict]], lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
        mode: Optional[str] = None, x_mode: Optional[str] = None, damping: Optional[float] = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode, x_mode=x_mode,
                        damping=damping)
        if not isinstance(model, nn.Module):
            self._setup_groups(model, defaults, nonfinite)
            return
        pairs = lorapro_pairs(model)
        factor_ids = {id(p) for pair in pairs for p in (pair.A, pair.B)}
        others, seen = [], set()
        for param in model.parameters():
            if param.requires_grad and id(param) not in factor_ids and id(param) not in seen:
                seen.add(id(param))
                others.append(param)
        self._setup(pairs, others, defaults, nonfinite)

    def _setup(self, pairs: list[LoraProPair], others: list[torch.Tensor], defaults: dict, nonfinite: str) -> None:
        _validate_hyper(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        _validate_overrides(defaults["mode"], defaults["x_mode"], defaults["damping"])
        validate_nonfinite(nonfinite)
        groups = [{"params": [p for pair in pairs for p in (pair.A, pair.B)], "lorapro": True}]
        if others:
            groups.append({"params": others, "lorapro": False})
        super().__init__(groups, defaults)
        self._finish(pairs, nonfinite)

    def _setup_groups(self, params: Union[Iterable[torch.Tensor], Iterable[dict]], defaults: dict,
                      nonfinite: str) -> None:
        """The optimizer over `params` (tensors or param groups, kept as given); pairs from the owning layers."""
        _validate_hyper(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        _validate_overrides(defaults["mode"], defaults["x_mode"], defaults["damping"])
        validate_nonfinite(nonfinite)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            _validate_overrides(group["mode"], group["x_mode"], group["damping"])
        self._finish(pairs_in_groups(self.param_groups), nonfinite)

    def _finish(self, pairs: list[LoraProPair], nonfinite: str) -> None:
        self._pairs = pairs
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        warn_if_dropout(pairs, stacklevel=4)  # _finish <- _setup* <- __init__ <- the user

    @property
    def pairs(self) -> list[LoraProPair]:
        """The (layer, adapter, A, B) pairs this optimizer adjusts."""
        return list(self._pairs)

    def _lr_scale(self, step: int, group: dict) -> float:
        """Multiplier of the group's lr at `step` (1-based); 1 here, a schedule in `AdamWLoRAPro`."""
        return 1.0

    def _options(self, pair: LoraProPair, group: dict) -> tuple[str, str, float]:
        opts = pair.options
        return (opts.mode if group["mode"] is None else group["mode"],
                opts.x_mode if group["x_mode"] is None else group["x_mode"],
                opts.damping if group["damping"] is None else group["damping"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimizer step: every pair with a gradient (LoRA-Pro), then the other parameters (AdamW).

        Pairs of one shape, dtype, options, scale, step count and param group are stepped together as a stack
        (`_Batch`): on a GPU the step is bound by the launches of its many small kernels, ~100 per pair alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        batches = self._batches([p for p in self._pairs if p.A.grad is not None or p.B.grad is not None], group_of)
        factors = {id(p) for pair in self._pairs for p in (pair.A, pair.B)}
        others = [(param, group) for group in self.param_groups for param in group["params"]  # groups added later
                  if param.grad is not None and id(param) not in factors]  # (add_param_group) too: plain AdamW
        # nothing has changed yet: refuse (or skip) a step with a NaN/inf gradient, checked on the stacks
        if not all_finite([t for b in batches for t in (b.gA, b.gB)] + [param.grad for param, _ in others]):
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                return loss
            raise nonfinite_error(self._named_grads())
        # every batch's Gram matrices decomposed together (one batched eigh per rank/device, not two per pair)
        grams = lp.grams_batched([(b.A, b.B) for b in batches], [b.damping for b in batches])
        for batch, g in zip(batches, grams):
            self._step_batch(batch, g)
        for param, group in others:
            self._step_plain(param, group)
        return loss

    def _named_grads(self) -> list[tuple[str, torch.Tensor]]:
        """(how an error names it, gradient) of every parameter with a gradient."""
        names = {id(p): f"{role} of {pair.describe()}" for pair in self._pairs for role, p in (("A", pair.A),
                                                                                               ("B", pair.B))}
        return [(names.get(id(p), f"parameter #{i} of param group #{j} (shape {tuple(p.shape)})"), p.grad)
                for j, g in enumerate(self.param_groups) for i, p in enumerate(g["params"]) if p.grad is not None]

    def _batches(self, pairs: list[LoraProPair], group_of: dict) -> list[_Batch]:
        """`pairs` grouped by everything their step depends on besides their values, each group stacked."""
        members: dict[tuple, list] = {}
        for pair in pairs:
            group = group_of[id(pair.A)]
            A, B = pair.matrices()  # (r, n), (m, r)
            gA, gB = _grad(pair.A).flatten(1), _grad(pair.B).flatten(1)
            key = (*self._options(pair, group), pair.scaling, id(group), self.state.get(pair.A, {}).get("step", 0),
                   A.device, *((t.shape, t.dtype) for t in (A, B, gA, gB)))
            members.setdefault(key, []).append((pair, A, B, gA, gB))
        batches = []
        for key, rows in members.items():
            (mode, x_mode, damping, s, _, step), group = key[:6], group_of[id(rows[0][0].A)]
            A, B, gA, gB = (torch.stack(ts) for ts in list(zip(*rows))[1:])  # (k, r, n), (k, m, r), alike
            batches.append(_Batch([row[0] for row in rows], group, mode, x_mode, damping, s, step, A, B, gA, gB))
        return batches

    def _step_batch(self, batch: _Batch, g: lp.Grams) -> None:
        """Step the k pairs of `batch` with `g`, the decomposed Grams of its stacked (A, B)."""
        dtype, step = lp.compute_dtype(batch.A, batch.B), batch.step + 1
        hp = _hyper(batch.group, self._lr_scale(step, batch.group))
        args = (batch.A, batch.B, batch.gA, batch.gB, batch.s)
        if batch.mode == "full":  # (m, n) moments stay per pair, never stacked
            shape = torch.Size((batch.B.shape[-2], batch.A.shape[-1]))
            states = [self._moments(pair.A, shape, dtype, batch.mode) for pair in batch.pairs]
            new_A, new_B = lp.full_mode_step(*args, [st["exp_avg"] for st in states],
                                             [st["exp_avg_sq"] for st in states], step, hp, batch.x_mode,
                                             batch.damping, g)
        else:
            states_A = [self._moments(pair.A, batch.A.shape[1:], dtype, batch.mode) for pair in batch.pairs]
            states_B = [self._moments(pair.B, batch.B.shape[1:], dtype, batch.mode) for pair in batch.pairs]
            per_param = [[st[key] for st in sts] for sts in (states_A, states_B) for key in _MOMENTS]  # 4 lists of k
            moments = tuple(torch.stack(ts) for ts in per_param)  # (k, r, n) x 2, (k, m, r) x 2: copies, stepped
            new_A, new_B = lp.efficient_mode_step(*args, moments, step, hp, batch.x_mode, batch.damping, g)
            torch._foreach_copy_([t for ts in per_param for t in ts], [t for m in moments for t in m.unbind(0)])
            states = states_A + states_B
        for st in states:
            st["step"] = step
        params = [pair.A for pair in batch.pairs] + [pair.B for pair in batch.pairs]
        news = [*new_A.unbind(0), *new_B.unbind(0)]  # (r, n) x k, (m, r) x k
        torch._foreach_copy_(params, [new.reshape(p.shape) for new, p in zip(news, params)])

    def _moments(self, param: torch.Tensor, shape: torch.Size, dtype: torch.dtype, mode: str = "adamw") -> dict:
        """The state of `param`, created at its first step: `step` and fp32 (fp64) moments of `shape`."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            for key in _MOMENTS:
                state[key] = torch.zeros(shape, dtype=dtype, device=param.device)
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
        direction = lp.adam_direction(state["exp_avg"], state["exp_avg_sq"], _grad(param), state["step"], hp)
        param.copy_(lp.decoupled_update(param, direction, hp))

    def state_dict(self) -> dict:
        """As `Optimizer.state_dict`, plus `skipped_steps` (steps skipped for non-finite gradients)."""
        return {**super().state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        """As `Optimizer.load_state_dict`, but the moments keep their fp32 (fp64) dtype: torch would cast them to
        the parameter's dtype (bf16 moments cannot represent v's decay). Restores `skipped_steps` (0 if absent)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        params = [p for g in self.param_groups for p in g["params"]]
        for index, entry in saved.items():
            param = params[int(index)]
            for key in _MOMENTS:
                if key in entry:
                    self.state[param][key] = entry[key].to(device=param.device, dtype=lp.compute_dtype(entry[key]),
                                                           copy=True)


def _validate_overrides(mode: Optional[str], x_mode: Optional[str], damping: Optional[float]) -> None:
    validate_options(mode if mode is not None else MODES[0], x_mode if x_mode is not None else lp.X_MODES[0],
                     damping if damping is not None else 0.0)
