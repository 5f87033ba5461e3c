"""One setup function per method: each takes the freshly loaded classifier and returns it ready to train with its
optimizer. Every method trains the classification head (`classifier`) whole; the adapters wrap the encoder's
linear layers (`query`, `key`, `value` and every `dense`) at rank 8.

LoRA-GA and LoRA-Pro are imported lazily, so the demo still runs the other methods where they are missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

TARGETS = ["query", "key", "value", "dense"]
RANK, ALPHA = 8, 16
GA_BATCHES = 8  # LoRA-GA: gradient-estimation batches (of the training batch size)

# Learning rates chosen by the sweep in docs/lr_sweep.md (`--sweep --max-length 64`, lowest validation loss).
DEFAULT_LRS: dict[str, float] = {
    "full": 3e-4,
    "lora": 3e-3,
    "rslora": 1.5e-3,
    "loraga": 3e-4,
    "lorapro_full": 3e-4,
    "lorapro_efficient": 1e-3,
}

# Sweep grid: four rates per method, factors of about 3.
SWEEP_LRS: dict[str, list[float]] = {
    "full": [3e-5, 1e-4, 3e-4, 1e-3],
    "lora": [3e-4, 1e-3, 3e-3, 1e-2],
    "rslora": [1.5e-4, 5e-4, 1.5e-3, 5e-3],
    "loraga": [3e-5, 1e-4, 3e-4, 1e-3],
    "lorapro_full": [3e-5, 1e-4, 3e-4, 1e-3],
    "lorapro_efficient": [3e-4, 1e-3, 3e-3, 1e-2],  # first grid 3e-5..1e-3 put the optimum at its top
}


# The MLM task (`--task mlm`): its methods and rates, chosen by validation loss on the grid below (seed 0, 60 steps,
# 16 x 64 tokens; docs/lr_sweep_mlm.md).
MLM_METHODS = ["full", "lora", "loraga", "lorapro_full", "lorapro_efficient"]
MLM_LRS: dict[str, float] = {
    "full": 1e-3,
    "lora": 3e-3,
    "loraga": 3e-4,
    "lorapro_full": 1e-3,
    "lorapro_efficient": 3e-3,
}
MLM_SWEEP_LRS: dict[str, list[float]] = {
    "full": [1e-4, 3e-4, 1e-3, 3e-3],
    "lora": [1e-3, 3e-3, 1e-2],
    "loraga": [1e-4, 3e-4, 1e-3],
    "lorapro_full": [3e-4, 1e-3, 3e-3],
    "lorapro_efficient": [1e-3, 3e-3],
}


@dataclass
class Setup:
    """A model ready to train, its optimizer, and what the setup itself cost."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    setup_seconds: float = 0.0
    notes: dict = field(default_factory=dict)
    after_step: Optional[Callable[[int], None]] = None  # called with the 0-based step after each optimizer step


def _lora_config(cls=None, ctx: dict | None = None, **extra):
    """Rank 8 on TARGETS. Classification: task type SEQ_CLS (the classifier trains whole). MLM (`ctx["task"]`):
    no task type, the head's own `dense` excluded (its transform trains whole, see `_train_head`)."""
    from peft import LoraConfig, TaskType

    cls = cls or LoraConfig
    if (ctx or {}).get("task") == "mlm":
        from .mlm import HEAD_EXCLUDE

        return cls(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), exclude_modules=list(HEAD_EXCLUDE),
                   **extra)
    return cls(task_type=TaskType.SEQ_CLS, r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), **extra)


def _train_head(model: nn.Module, ctx: dict) -> nn.Module:
    """MLM: the head transform and the decoder bias train in every method (as the classifier does for SEQ_CLS)."""
    if ctx.get("task") == "mlm":
        from .mlm import head_parameters

        for p in head_parameters(model):
            p.requires_grad_(True)
    return model


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def setup_full(model: nn.Module, lr: float, ctx: dict) -> Setup:
    """Full fine-tuning: every weight trains with AdamW."""
    for p in model.parameters():
        p.requires_grad_(True)
    return Setup(model, _adamw(model, lr))


def setup_lora(model: nn.Module, lr: float, ctx: dict) -> Setup:
    """LoRA (Hu et al. 2021): `W + (alpha/r) B A`, A Kaiming-uniform, B = 0; AdamW on A, B and the head."""
    from peft import get_peft_model

    model = _train_head(get_peft_model(model, _lora_config(ctx=ctx)), ctx)
    return Setup(model, _adamw(model, lr))


def setup_rslora(model: nn.Module, lr: float, ctx: dict) -> Setup:
    """rsLoRA (Kalajdzievski 2023): LoRA with the scale `alpha / sqrt(r)` instead of `alpha / r`."""
    from peft import get_peft_model

    model = _train_head(get_peft_model(model, _lora_config(ctx=ctx, use_rslora=True)), ctx)
    return Setup(model, _adamw(model, lr))


def setup_loraga(model: nn.Module, lr: float, ctx: dict) -> Setup:
    """LoRA-GA (Wang et al. 2024): A, B from the SVD of the gradient estimated on GA_BATCHES training batches,
    `W <- W - s B A` so the output is unchanged at init; rsLoRA scale as in the paper; AdamW."""
    from peft import LoraGAConfig, get_peft_model
    from peft.utils import lora_ga_utils as ga

    batches = ctx["ga_batches"]
    config = _lora_config(LoraGAConfig, ctx, use_rslora=True, iters=len(batches), bsz=ctx["batch_size"],
                          max_length=ctx["max_length"])
    start = time.perf_counter()
    model.train()
    named_grad = ga.estimate_gradient(model=model, dataloader=batches, accelerator=None, quant_flag=False,
                                   peft_config=config)
    with ga.LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=config, adapter_name="default")
    del named_grad
    model = _train_head(model, ctx)
    return Setup(model, _adamw(model, lr), setup_seconds=time.perf_counter() - start,
                 notes={"estimation_batches": len(batches)})


def _setup_lorapro(model: nn.Module, lr: float, mode: str, ctx: dict) -> Setup:
    from peft import LoraProConfig, get_peft_model
    from peft.optimizers import LoraProAdamW

    model = _train_head(get_peft_model(model, _lora_config(LoraProConfig, ctx, mode=mode)), ctx)
    return Setup(model, LoraProAdamW(model, lr=lr, weight_decay=0.0))


def setup_lorapro_full(model: nn.Module, lr: float, ctx: dict) -> Setup:
    """LoRA-Pro (Wang et al. 2025), `full` mode: Adam moments of the equivalent gradient in the m x n space, the
    Adam direction projected back onto A and B (the paper's Algorithm 2)."""
    return _setup_lorapro(model, lr, "full", ctx)


def setup_lorapro_efficient(model: nn.Module, lr: float, ctx: dict) -> Setup:
    """LoRA-Pro, `efficient` mode: adjusted gradients of A and B, then per-factor AdamW (LoRA's memory)."""
    return _setup_lorapro(model, lr, "efficient", ctx)


METHODS: dict[str, Callable[[nn.Module, float, dict], Setup]] = {
    "full": setup_full,
    "lora": setup_lora,
    "rslora": setup_rslora,
    "loraga": setup_loraga,
    "lorapro_full": setup_lorapro_full,
    "lorapro_efficient": setup_lorapro_efficient,
}
DEFAULT_METHODS = list(METHODS)  # what `make demo` runs; the LoRA variants below run on request (--methods)

from .variants import VARIANTS  # noqa: E402  (the variants' setups use Setup, defined above)

for _name, _spec in VARIANTS.items():
    METHODS[_name] = _spec.setup
    DEFAULT_LRS.setdefault(_name, _spec.lr)
    SWEEP_LRS.setdefault(_name, _spec.sweep)

LABELS = {
    "full": "Full fine-tuning",
    "lora": "LoRA",
    "rslora": "rsLoRA",
    "loraga": "LoRA-GA",
    "lorapro_full": "LoRA-Pro (full)",
    "lorapro_efficient": "LoRA-Pro (efficient)",
    **{name: spec.label for name, spec in VARIANTS.items()},
}


def available(method: str) -> bool:
    """Whether the package provides what `method` needs (LoRA-GA and LoRA-Pro are optional here)."""
    try:
        if method == "loraga":
            from peft import LoraGAConfig  # noqa: F401
            from peft.utils import lora_ga_utils  # noqa: F401
        elif method.startswith("lorapro"):
            from peft import LoraProConfig  # noqa: F401
            from peft.optimizers import LoraProAdamW  # noqa: F401
    except ImportError:
        return False
    return True
