"""The LoRA variants (docs/variants.md) as demo methods: `python examples/demo_bbc_minilm.py --methods lora,loha`.

Not in the default set (`make demo` stays short). Each entry: a label, a config factory (the same targets as LoRA,
`TARGETS`, sized near LoRA's rank-8 parameter budget), a learning rate, a sweep grid, and optionally an `after_step`
(called after each optimizer step: AdaLoRA's rank allocation, SoRA's proximal step, ...). Learning rates are
first guesses unless the entry says it was swept.
"""

from __future__ import annotations

import weakref
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


def _sora_config(ctx: dict):
    """SoRA: r_max 8 (LoRA rank 8's parameters plus 8 gate entries per matrix), scale 16 / 8 as LoRA's; gates
    N(0, 1) as the authors' code; L1 weight 1: each step shrinks the gates by lr * 1 (proximal step)."""
    from peft import SoraConfig, TaskType

    return SoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=list(TARGETS), gate_init="normal",
                      sparsity_lambda=1.0)


_SORA_OPTIMIZERS: "weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer]" = weakref.WeakKeyDictionary()


def _sora_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW on everything trainable, gates included (the smooth step); kept so that `after_step` reads the
    scheduled learning rate the gates were just stepped with."""
    from .methods import _adamw

    _SORA_OPTIMIZERS[model] = optimizer = _adamw(model, lr)
    return optimizer


def _sora_after_step(model: nn.Module, step: int, ctx: dict) -> None:
    """The L1 proximal step on the gates, `g <- T_{lr * lambda}(g)`, right after AdamW's step."""
    model.base_model.apply_gate_proximal(lr=_SORA_OPTIMIZERS[model].param_groups[0]["lr"])


VARIANTS["sora"] = VariantSpec("SoRA", _sora_config, lr=3e-3, sweep=[1e-3, 3e-3, 1e-2], after_step=_sora_after_step,
                               optimizer=_sora_optimizer)


def _vera_config(ctx: dict):
    """VeRA: r 1024 (the paper's GLUE rank), shared frozen projections; trains 37 * 1024 + 21,120 = 59,008 scaling
    entries on MiniLM's 37 target matrices (6 blocks x 6, plus the pooler's dense; LoRA r 8: 337,920): VeRA cannot
    reach LoRA's budget at a sensible rank (it would need r ~ 8,500), which is the method's point. lambda_d = 0.1,
    lambda_b = 0."""
    from peft import TaskType, VeraConfig

    return VeraConfig(task_type=TaskType.SEQ_CLS, r=1024, target_modules=list(TARGETS), d_initial=0.1,
                      save_projection=True)


VARIANTS["vera"] = VariantSpec("VeRA", _vera_config, lr=1e-2, sweep=[3e-3, 1e-2, 3e-2])


def _tiedlora_config(ctx: dict):
    """Tied-LoRA with tied A, B and vectors u, v all trained: r 64, one (A, B) per weight shape (384x384, 1536x384,
    384x1536) tied over the 37 target matrices: 64 * 4,608 shared + 37 * 64 + 21,120 vectors = 318,400 trainable
    (LoRA r 8: 337,920); s = lora_alpha / r = 1."""
    from peft import TaskType, TiedLoraConfig

    return TiedLoraConfig(task_type=TaskType.SEQ_CLS, r=64, lora_alpha=64, target_modules=list(TARGETS))


# lr: not swept; 100-step runs reached training loss@100 0.330 at 1e-3 and 0.037 at 3e-3
VARIANTS["tiedlora"] = VariantSpec("Tied-LoRA", _tiedlora_config, lr=3e-3, sweep=[1e-3, 3e-3, 1e-2])


def _krona_config(ctx: dict):
    """KronA: A 8 x 4 on every target (8 divides the out sizes 384 / 1536, 4 the in sizes), B (out/8) x (in/4):
    32 + 4,608 per 384x384 matrix, 32 + 18,432 per 1536x384 / 384x1536 one: 332,928 on the 36 block matrices +
    4,640 on the pooler's dense = 337,568 trainable (LoRA r 8: 331,776 + 6,144 = 337,920); s = 1; A
    Kaiming-uniform, B zero."""
    from peft import KronAConfig, TaskType

    return KronAConfig(task_type=TaskType.SEQ_CLS, krona_dim=[8, 4], krona_scale=1.0, target_modules=list(TARGETS))


VARIANTS["krona"] = VariantSpec("KronA", _krona_config, lr=3e-3, sweep=[1e-3, 3e-3, 1e-2])


def _dylora_config(ctx: dict):
    """DyLoRA: r 8, r_min 1, lora_alpha 16 (LoRA r 8's parameters, 337,920); each step samples b ~ U{1..8} and
    trains only the b-th row / column (the paper's frozen mode) with scale 16 / b; evaluated at the full rank 8."""
    from peft import DyLoRAConfig, TaskType

    return DyLoRAConfig(task_type=TaskType.SEQ_CLS, r=8, r_min=1, lora_alpha=16, target_modules=list(TARGETS))


VARIANTS["dylora"] = VariantSpec("DyLoRA", _dylora_config, lr=3e-3, sweep=[1e-3, 3e-3, 1e-2])


def _loha_config(ctx: dict):
    """LoHa: r 4, `delta W = (alpha / r) (W1a W1b) * (W2a W2b)`: 2 r (m + n) = 8 (m + n) per m x n matrix, LoRA r 8's
    count exactly (337,920 on the 37 targets) while delta W can reach rank r^2 = 16; s = alpha / r = 2 as LoRA's."""
    from peft import LoHaConfig, TaskType

    return LoHaConfig(task_type=TaskType.SEQ_CLS, r=4, alpha=8, target_modules=list(TARGETS))


VARIANTS["loha"] = VariantSpec("LoHa", _loha_config, lr=3e-3, sweep=[1e-3, 3e-3, 1e-2])


def _lokr_config(ctx: dict):
    """LoKr: decompose_factor 4, r 32: W1 4 x 4 (full) and W2 = W2a W2b (rank 32) of (m/4) x (n/4): 16 + 32 (m + n) / 4
    per m x n matrix, 6,160 per 384x384 and 15,376 per 1536x384 / 384x1536 one: 338,512 on the 37 targets (LoRA r 8:
    337,920); s = alpha / r = 1; W1 starts at zero."""
    from peft import LoKrConfig, TaskType

    return LoKrConfig(task_type=TaskType.SEQ_CLS, r=32, alpha=32, decompose_factor=4, target_modules=list(TARGETS))


VARIANTS["lokr"] = VariantSpec("LoKr", _lokr_config, lr=3e-3, sweep=[1e-3, 3e-3, 1e-2])
