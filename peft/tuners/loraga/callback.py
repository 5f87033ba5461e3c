"""`LoraGACallback`: LoRA-GA inside transformers' `Trainer` (and TRL's trainers, which take the same `callbacks=`).

    model = get_peft_model(base, LoraGAConfig(r=8, lora_alpha=16, use_rslora=True, iters=8, target_modules=[...]))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LoraGACallback()])
    trainer.train()        # on_train_begin: G from the first `iters` training batches, A, B from its SVD, W offset
    trainer.save_model()   # like every checkpoint-N: the plain rank-2r LoRA that fits the ORIGINAL base

The Trainer builds its optimizer (and the accelerate / DDP wrappers) before `on_train_begin`, so the callback
initialises in place: `LoraGAModel.initialise_adapter` copies A and B into the Parameter objects the optimizer
already holds, and rewrites the frozen base weights' data. The estimation batches are the first `iters` batches of
the Trainer's own train dataloader; every RNG the estimation touches (the sampler's shuffle seed, dropout) is put
back afterwards, so the training run draws the same batches and masks as without the callback, and starts with
those very batches.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional

import torch
from transformers import TrainerCallback

from .config import LoraGAConfig
from .layout import factor_params
from .model import LoraGAModel, init_record


class LoraGACallback(TrainerCallback):
    """Initialise a LoRA-GA adapter at the start of `Trainer.train()` from the Trainer's own training batches.

    The model given to the Trainer is `get_peft_model(base, LoraGAConfig(...))` built with no gradients waiting
    (outside `LoraGAContext`: LoRA's default init, B = 0, base untouched). At `on_train_begin` the callback runs
    `estimate_gradient` on the first `config.iters` batches of the train dataloader (the Trainer's batch size and
    collator; `bsz` / `max_length` of the config are not used), then `initialise_adapter`: A, B from the SVD of the
    gradient, base weights offset by `-s B A`, so the model's output is unchanged.

    An adapter that is LoRA-GA initialised already is left alone: one built inside `LoraGAContext`, or one that
    `resume_from_checkpoint` restored from a checkpoint (the Trainer loads it before `on_train_begin`).

    Args:
        adapter_name: the adapter to initialise (default: the model's active adapter).
    """

    def __init__(self, adapter_name: Optional[str] = None) -> None:
        self.adapter_name = adapter_name

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        _refuse_deepspeed(args)
        tuner, name = _loraga_tuner(model, self.adapter_name)
        if name in init_record(tuner):
            return control
        if state.global_step > 0:
            raise ValueError(
                f"Training resumes at step {state.global_step}, but LoRA-GA adapter {name!r} has no initial factors: "
                "the checkpoint was not written by a LoRA-GA model that was initialised (LoraGACallback or "
                "LoraGAContext). Re-initialising now would throw away the trained weights; resume without "
                "LoraGACallback to continue it as a plain LoRA, or start the run again."
            )
        _check_default_init(tuner, name)
        if train_dataloader is None:
            raise ValueError("LoraGACallback needs the Trainer's train_dataloader at on_train_begin (transformers "
                             "passes it to callbacks); got None.")
        from .estimate import estimate_gradient

        config = tuner.peft_config[name]
        with preserved_rng():
            named_grad = estimate_gradient(model, train_dataloader, peft_config=config, iters=config.iters)
        tuner.initialise_adapter(name, named_grad)
        return control


def _loraga_tuner(model, adapter_name: Optional[str]) -> tuple[LoraGAModel, str]:
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, LoraGAModel):
        raise ValueError(f"LoraGACallback trains a LoRA-GA model: get_peft_model(base, LoraGAConfig(...)); the "
                         f"Trainer's model is a {type(model).__name__}"
                         + (f" around a {type(tuner).__name__}." if tuner is not None else "."))
    name = adapter_name if adapter_name is not None else model.active_adapter
    if not isinstance(tuner.peft_config.get(name), LoraGAConfig):
        raise ValueError(f"Adapter {name!r} is not a LoRA-GA adapter; LoRA-GA adapters of this model: "
                         f"{sorted(n for n, c in tuner.peft_config.items() if isinstance(c, LoraGAConfig))}.")
    return tuner, name


def _check_default_init(tuner: LoraGAModel, adapter_name: str) -> None:
    """The init overwrites A and B: refuse weights that are not LoRA's default init (B = 0), e.g. loaded ones."""
    for key, layer in tuner.adapter_layers(adapter_name):
        if torch.count_nonzero(factor_params(layer, adapter_name)[1]):
            raise ValueError(
                f"LoRA-GA adapter {adapter_name!r} has a nonzero B at {key!r} (loaded or trained weights?), and the "
                "LoRA-GA init would overwrite it. LoraGACallback initialises a fresh adapter: build the model with "
                "get_peft_model(base, LoraGAConfig(...)) outside LoraGAContext."
            )


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Inside: anything may draw from torch's (CPU and CUDA), Python's and NumPy's global RNGs; on exit they are back
    where they were, so the code inside leaves no trace on the random stream of what follows."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None, random.getstate())
    np = _numpy()
    np_state = np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state_all(states[1])
        random.setstate(states[2])
        if np is not None:
            np.random.set_state(np_state)


def _numpy():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with transformers
        return None
    return numpy


__all__ = ["LoraGACallback"]


def _refuse_deepspeed(args) -> None:
    """Under DeepSpeed ZeRO the optimizer steps its own fp32 master copy of A and B, which the in-place
    initialisation cannot reach (ZeRO-2: the init is overwritten at step 1 while the base stays offset; ZeRO-3: the
    weights are partitioned). Refuse instead of training the wrong thing."""
    import os

    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise ValueError(
            "LoraGACallback does not work under DeepSpeed ZeRO: DeepSpeed keeps its own fp32 master copy of the LoRA "
            "factors (ZeRO-2 overwrites the LoRA-GA init at the first step, ZeRO-3 partitions the weights). Use DDP "
            "or FSDP2 (docs/multi_gpu.md), or initialise before DeepSpeed wraps the model (estimate_gradient + "
            "LoraGAContext, then train)."
        )
