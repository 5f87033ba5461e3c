"""LoRA-Pro optimizers: `LoraProAdamW` (a `torch.optim.Optimizer` built from the model), `register_lorapro_adjustment`
(LoRA-Pro gradients for any torch optimizer, e.g. SGD: the paper's Algorithm 1) and the seed API `AdamWLoRAPro`.

The adjustment happens inside `step()` (or the step pre-hook), so it runs once per optimizer step: after gradient
accumulation, after DDP has averaged the gradients and after gradient clipping.
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
from .pairs import LoraProPair, lorapro_pairs, pairs_from_parameters, pairs_in_groups

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
    """AdamW with LoRA-Pro's adjusted gradients for the A/B factors of a LoRA-Pro model.

    Args:
        model: the model (a `PeftModel` from `get_peft_model(model, LoraProConfig(...))`, or any module holding
            LoRA-Pro layers), or its parameters / param groups, as torch optimizers take them (what transformers'
            `Trainer(optimizer_cls_and_kwargs=(LoraProAdamW, {...}))` passes: a decay and a no-decay group, each
            with its own `weight_decay`). Either way A and B are paired by the LoRA-Pro layers that own them, never
            by their position; a pair's A and B must be in the same group.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (defaults for the groups); weight decay is decoupled
            (`p <- p - lr wd p`) on A, B and on every other trainable parameter.
        mode, x_mode, damping: override the adapters' `LoraProConfig` options (None: each adapter's own).

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
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode, x_mode=x_mode,
                        damping=damping)
        if not isinstance(model, nn.Module):
            self._setup_groups(model, defaults)
            return
        pairs = lorapro_pairs(model)
        factor_ids = {id(p) for pair in pairs for p in (pair.A, pair.B)}
        others, seen = [], set()
        for param in model.parameters():
            if param.requires_grad and id(param) not in factor_ids and id(param) not in seen:
                seen.add(id(param))
                others.append(param)
        self._setup(pairs, others, defaults)

    def _setup(self, pairs: list[LoraProPair], others: list[torch.Tensor], defaults: dict) -> None:
        _validate_hyper(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        _validate_overrides(defaults["mode"], defaults["x_mode"], defaults["damping"])
        groups = [{"params": [p for pair in pairs for p in (pair.A, pair.B)], "lorapro": True}]
        if others:
            groups.append({"params": others, "lorapro": False})
        super().__init__(groups, defaults)
        self._pairs = pairs

    def _setup_groups(self, params: Union[Iterable[torch.Tensor], Iterable[dict]], defaults: dict) -> None:
        """The optimizer over `params` (tensors or param groups, kept as given); pairs from the owning layers."""
        _validate_hyper(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        _validate_overrides(defaults["mode"], defaults["x_mode"], defaults["damping"])
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            _validate_overrides(group["mode"], group["x_mode"], group["damping"])
        self._pairs = pairs_in_groups(self.param_groups)

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
        # every batch's Gram matrices decomposed together (one batched eigh per rank/dtype/device, not two per pair)
        grams = lp.grams_batched([(b.A, b.B) for b in batches], [b.damping for b in batches])
        for batch, g in zip(batches, grams):
            self._step_batch(batch, g)
        factors = {id(p) for pair in self._pairs for p in (pair.A, pair.B)}
        for group in self.param_groups:  # everything else, groups added later (add_param_group) too: plain AdamW
            for param in group["params"]:
                if param.grad is not None and id(param) not in factors:
                    self._step_plain(param, group)
        return loss

    def _batches(self, pairs: list[LoraProPair], group_of: dict) -> list[_Batch]:
        """`pairs` grouped by everything their step depends on besides their values, each group stacked."""
        members: dict[tuple, list] = {}
        for pair in pairs:
            group = group_of[id(pair.A)]
            A, B = pair.layer.lorapro_matrices(pair.adapter_name)  # (r, n), (m, r)
            gA, gB = _grad(pair.A).flatten(1), _grad(pair.B).flatten(1)
            key = (*self._options(pair, group), pair.scaling, id(group), self.state[pair.A].get("step", 0),
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

    def load_state_dict(self, state_dict: dict) -> None:
        """As `Optimizer.load_state_dict`, but the moments keep their fp32 (fp64) dtype: torch would cast them to
        the parameter's dtype (bf16 moments cannot represent v's decay)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
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


def register_lorapro_adjustment(
    optimizer: Optimizer, model: nn.Module, x_mode: Optional[str] = None, damping: Optional[float] = None
):
    """Make any torch optimizer a LoRA-Pro optimizer: a step pre-hook replaces the gradients of the LoRA-Pro
    factors by their adjusted gradients (paper eq. 8) right before each `optimizer.step()`. With SGD this is the
    paper's Algorithm 1. With a closure (`optimizer.step(closure)`, e.g. LBFGS) the gradients the closure makes are
    adjusted right after each call of it. A wrapper such as accelerate's `AcceleratedOptimizer` gets the hook on the
    optimizer it wraps. Returns the hook's handle (`handle.remove()` uninstalls it)."""
    optimizer = _innermost(optimizer)
    if isinstance(optimizer, LoraProAdamW):
        raise ValueError("LoraProAdamW already adjusts the gradients; registering the adjustment would do it twice.")
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"Expected a torch.optim.Optimizer, got {type(optimizer)!r}.")
    _validate_overrides(None, x_mode, damping)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    pairs = []
    for pair in lorapro_pairs(model):
        has_A, has_B = id(pair.A) in in_optimizer, id(pair.B) in in_optimizer
        if has_A != has_B:
            raise ValueError(f"The optimizer holds only one factor of LoRA-Pro adapter {pair.adapter_name!r}; "
                             "give it both A and B.")
        if has_A:
            pairs.append(pair)
    if not pairs:
        raise ValueError("The optimizer holds no LoRA-Pro factor of this model.")

    def adjust(opt: Optimizer, args: tuple, kwargs: dict):  # args: (optimizer, *step's positional arguments)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            _adjust_gradients(pairs, x_mode, damping)
            return None

        def adjusted_closure():  # the step makes its gradients inside the closure: adjust them there
            loss = closure()
            _adjust_gradients(pairs, x_mode, damping)
            return loss

        if len(args) > 1:
            return (args[0], adjusted_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": adjusted_closure}

    return optimizer.register_step_pre_hook(adjust)


def _innermost(optimizer: Optimizer) -> Optimizer:
    """The optimizer whose `step` really runs: accelerate's `AcceleratedOptimizer` (as the Trainer holds it) keeps it
    in `.optimizer` and has no step hooks of its own."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def _factors(pairs: list[LoraProPair], dampings: list[float]) -> tuple[list, list[float]]:
    """((A (r, n), B (m, r)) in the compute dtype for every pair, dampings): the arguments of `lp.grams_batched`."""
    factors = []
    for pair in pairs:
        A, B = pair.layer.lorapro_matrices(pair.adapter_name)
        dtype = lp.compute_dtype(A, B)
        factors.append((A.to(dtype), B.to(dtype)))
    return factors, dampings


def _adjust_gradients(pairs: list[LoraProPair], x_mode: Optional[str], damping: Optional[float]) -> None:
    """Replace the gradients of every pair's A and B by their adjusted gradients (paper eq. 8), in place."""
    todo = [pair for pair in pairs if pair.A.grad is not None or pair.B.grad is not None]
    grams = lp.grams_batched(*_factors(todo, [p.options.damping if damping is None else damping for p in todo]))
    for pair, g in zip(todo, grams):
        gA, gB = pair.layer.lorapro_adjusted_gradients(
            pair.adapter_name, _grad(pair.A), _grad(pair.B), x_mode, damping, g)
        for param, new in ((pair.A, gA), (pair.B, gB)):
            if param.grad is None:
                param.grad = new.to(param.dtype)
            else:
                param.grad.copy_(new)


def seed_cosine_scale(step: int, T_max: int) -> float:
    """The seed port's in-optimizer schedule: cosine from 1 to 0 over `T_max` steps, then restarts with the
    period doubled (T_max, 2 T_max, 4 T_max, ...): `0.5 + 0.5 cos(pi k / period)`, k the step within the period."""
    k, period = step - 1, T_max
    while k >= period:
        k -= period
        period *= 2
    return 0.5 + 0.5 * math.cos(math.pi * k / period)


class AdamWLoRAPro(LoraProAdamW):
    """The seed API: `AdamWLoRAPro(params, lr, weight_decay, T_max, scaling_factor)`, a `LoraProAdamW` over the
    LoRA-Pro factors in `params` (paired by the layers that own them).

    Args:
        params: LoRA-Pro A/B parameters (e.g. `[p for p in model.parameters() if p.requires_grad]`). Frozen ones
            are skipped; a parameter no LoRA-Pro layer owns, or whose partner is missing, is an error.
        T_max: None (default) leaves the learning rate to the caller (a torch scheduler). An int turns on the
            seed's built-in schedule, `lr * (0.5 + 0.5 cos(pi k / period))` with warm restarts whose period starts
            at `T_max` steps and doubles at each restart (`seed_cosine_scale`). Do not combine it with a scheduler.
        scaling_factor: the LoRA scale s the caller believes the layers use; None skips the check. It is only
            checked: s is always read from each layer (rsLoRA included).
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float = 1e-3, weight_decay: float = 0.01,
        T_max: Optional[int] = None, scaling_factor: Optional[float] = None, *,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, mode: Optional[str] = None,
        x_mode: Optional[str] = None, damping: Optional[float] = None,
    ) -> None:
        if T_max is not None and (not isinstance(T_max, int) or isinstance(T_max, bool) or T_max < 1):
            raise ValueError(f"Invalid T_max={T_max!r}: expected None or a positive int (steps).")
        pairs = pairs_from_parameters(params)
        if scaling_factor is not None:
            for pair in pairs:
                if not math.isclose(pair.scaling, scaling_factor, rel_tol=1e-6):
                    raise ValueError(
                        f"scaling_factor={scaling_factor!r} disagrees with the scale s={pair.scaling!r} of LoRA-Pro "
                        f"adapter {pair.adapter_name!r} (lora_alpha / r, or / sqrt(r) with rsLoRA); s is read from "
                        "the layers, pass scaling_factor=None or the right value."
                    )
        self._setup(pairs, [], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode,
                                    x_mode=x_mode, damping=damping, T_max=T_max))

    def _lr_scale(self, step: int, group: dict) -> float:
        return 1.0 if group.get("T_max") is None else seed_cosine_scale(step, group["T_max"])
