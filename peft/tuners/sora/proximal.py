"""`SoraGateProximal`: the L1 proximal step on SoRA's gates as a `torch.optim.Optimizer` over the gate parameters.

Two ways to train the gate (`T_tau` is soft thresholding, `eta` the learning rate, `lambda` the sparsity weight):

- `gradient_step=False` (default): the main optimizer (e.g. AdamW) steps every trainable parameter, gates
  included; then `SoraGateProximal.step()` applies `g <- T_{eta * lambda}(g)`. Call it right after the main
  optimizer's `step()`. `lr` may be that optimizer itself: `eta` is then read from the param group holding each
  gate at every step, so it follows the main learning-rate schedule. This is the authors' code's form (Adam on g,
  then thresholding), and what the demo uses.
- `gradient_step=True`: this optimizer alone trains the gates with the paper's plain proximal gradient step
  (eq. 6), `g <- T_{eta * lambda}(g - eta * dL/dg)`; leave the gates out of the main optimizer
  (`sora_gate_parameters` / `non_gate_parameters`). A torch LR scheduler can drive its `lr`.

The sparsity weight comes from each adapter's `SoraConfig.sparsity_lambda` unless `sparsity_lambda` is given, and
may follow the paper's sparsifying schedule (`schedule`, `max_lambda`, `schedule_steps`, `warmup_steps`; see
`scheduled_lambda`).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .functional import LAMBDA_SCHEDULES, proximal_gate_step, scheduled_lambda
from .layer import SoraLayer


def _gates_by_adapter(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    out: dict[str, list[nn.Parameter]] = {}
    for module in model.modules():
        if isinstance(module, SoraLayer):
            for name, gate in module.sora_gate.items():
                out.setdefault(name, []).append(gate)
    return out


def sora_gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every SoRA gate of `model` (all adapters), found through the SoRA layers."""
    return [g for gates in _gates_by_adapter(model).values() for g in gates]


def non_gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of `model` that are not SoRA gates (for the main optimizer with
    `gradient_step=True`)."""
    gates = {id(g) for g in sora_gate_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in gates]


def _check_number(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid {name}={value!r}: expected a finite number >= 0.")


class SoraGateProximal(torch.optim.Optimizer):
    """Proximal (L1 soft-thresholding) step on the SoRA gates of `model` (a PeftModel, SoraModel or a model with
    SoRA layers). One param group per adapter, holding `lr` and `sparsity_lambda`. See the module docstring for
    the two modes; `step()` returns nothing and counts optimizer steps for the schedule (`state_dict()` keeps the
    count)."""

    def __init__(
        self, model: nn.Module, lr: Union[float, torch.optim.Optimizer], sparsity_lambda: Optional[float] = None,
        gradient_step: bool = False, schedule: str = "constant", max_lambda: Optional[float] = None,
        schedule_steps: int = 0, warmup_steps: int = 0,
    ) -> None:
        self.main_optimizer = lr if isinstance(lr, torch.optim.Optimizer) else None
        if self.main_optimizer is not None and gradient_step:
            raise ValueError("Invalid gradient_step=True with lr given as an optimizer: that optimizer already takes "
                             "the smooth step on the gates; expected a float lr for gradient_step=True.")
        if self.main_optimizer is None:
            _check_number("lr", lr)
        _check_number("sparsity_lambda", sparsity_lambda, allow_none=True)
        _check_number("max_lambda", max_lambda, allow_none=True)
        if schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"Invalid schedule={schedule!r}: expected one of {LAMBDA_SCHEDULES}.")
        scheduled_lambda(0, 1.0, max_lambda, schedule_steps, schedule)  # the schedule's arguments, checked now
        gates = _gates_by_adapter(model)
        if not gates:
            raise ValueError(f"Invalid model of type {type(model).__name__}: it has no SoRA layers.")
        configs = getattr(model, "peft_config", {}) or {}
        groups = []
        for name, params in gates.items():
            lam = sparsity_lambda
            if lam is None:
                if name not in configs:
                    raise ValueError(f"Invalid sparsity_lambda=None: adapter {name!r} has no config on this model to "
                                     "read it from; expected a number.")
                lam = configs[name].sparsity_lambda
            groups.append({"params": params, "adapter": name, "sparsity_lambda": float(lam)})
        defaults = {"lr": 0.0 if self.main_optimizer is not None else float(lr), "sparsity_lambda": 0.0}
        super().__init__(groups, defaults)
        self.gradient_step = bool(gradient_step)
        self.schedule = dict(schedule=schedule, max_lambda=max_lambda, schedule_steps=int(schedule_steps),
                             warmup_steps=int(warmup_steps))
        self.steps_done = 0

    def _main_lrs(self) -> dict[int, float]:
        if self.main_optimizer is None:
            return {}
        return {id(p): group["lr"] for group in self.main_optimizer.param_groups for p in group["params"]}

    def current_lambda(self, group: dict) -> float:
        """The sparsity weight of `group` at the current step (its `sparsity_lambda` under the schedule)."""
        return scheduled_lambda(self.steps_done, group["sparsity_lambda"], **self.schedule)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        main_lrs = self._main_lrs()
        for group in self.param_groups:
            lam = self.current_lambda(group)
            for gate in group["params"]:
                if not gate.requires_grad:
                    continue  # a frozen adapter's gate (inference mode) stays as it is
                if self.main_optimizer is not None and id(gate) not in main_lrs:
                    continue  # not trained by the main optimizer (frozen or inactive adapter): leave it
                lr = main_lrs.get(id(gate), group["lr"])
                grad = gate.grad if self.gradient_step else None
                if self.gradient_step and grad is None:
                    continue  # no gradient this step (inactive adapter)
                gate.copy_(proximal_gate_step(gate, lr, lam, grad))
        self.steps_done += 1
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["steps_done"] = self.steps_done
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.steps_done = int(state_dict.pop("steps_done", 0))
        super().load_state_dict(state_dict)
