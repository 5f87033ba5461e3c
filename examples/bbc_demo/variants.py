"""The LoRA variants (docs/variants.md) as demo methods: `python examples/demo_bbc_minilm.py --methods lora,loha`.

Not in the default set (`make demo` stays short). Each entry: a label, a config factory (the same targets as LoRA,
`TARGETS`, sized near LoRA's rank-8 parameter budget), a learning rate, a sweep grid, and optionally an `after_step`
(called after each optimizer step: AdaLoRA's rank allocation, SoRA's proximal step, ...). Learning rates are
first guesses unless the entry says it was swept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

TARGETS = ["query", "key", "value", "dense"]


@dataclass
class VariantSpec:
    label: str
    config: Callable[[dict], object]  # ctx (steps, batch_size, ...) -> a PeftConfig with task_type SEQ_CLS
    lr: float
    sweep: list[float]
    after_step: Optional[Callable[[nn.Module, int, dict], None]] = None  # (model, step, ctx)
    optimizer: Optional[Callable[[nn.Module, float], torch.optim.Optimizer]] = None  # default AdamW
    notes: dict = field(default_factory=dict)

    def setup(self, model: nn.Module, lr: float, ctx: dict):
        from peft import get_peft_model

        from .methods import Setup, _adamw

        model = get_peft_model(model, self.config(ctx))
        optimizer = (self.optimizer or _adamw)(model, lr)
        hook = None if self.after_step is None else (lambda step, m=model: self.after_step(m, step, ctx))
        return Setup(model, optimizer, notes=dict(self.notes), after_step=hook)


# One entry per variant, added by the variant's author: VARIANTS["loha"] = VariantSpec("LoHa", ..., lr=..., ...)
VARIANTS: dict[str, VariantSpec] = {}


def _adalora_config(ctx: dict):
    """AdaLoRA: init_r 8 (LoRA rank 8's parameters plus r singular values per matrix), pruned to an average rank of
    4 between 10% and 80% of the steps; scale lora_alpha / init_r = 2 as LoRA's 16 / 8."""
    from peft import AdaLoraConfig, TaskType

    steps = int(ctx["steps"])
    return AdaLoraConfig(task_type=TaskType.SEQ_CLS, init_r=8, target_r=4, lora_alpha=16, target_modules=list(TARGETS),
                         total_step=steps, tinit=steps // 10, tfinal=steps // 5, deltaT=1)


def _adalora_after_step(model: nn.Module, step: int, ctx: dict) -> None:
    model.base_model.update_and_allocate(step)


VARIANTS["adalora"] = VariantSpec("AdaLoRA", _adalora_config, lr=3e-3, sweep=[1e-3, 3e-3, 1e-2],
                                  after_step=_adalora_after_step)
