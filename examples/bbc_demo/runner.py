"""Train one (method, seed, learning rate) and measure it. `run_one` is what each spawned worker process runs, so
that every method starts from a fresh process and its memory peak is its own.

Peak memory is the process's resident set (RSS, Linux `VmHWM`): the high-water mark is reset just before training
(`/proc/self/clear_refs` with 5) and read after, minus the RSS at that moment (model loaded and set up), so the
number is what training adds: gradients, optimizer state, activations. Where the reset is not allowed, a thread
samples `VmRSS` every 5 ms instead (the job records which).
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from pathlib import Path

import torch

from . import mlm
from .data import batch_indices, load_splits
from .methods import GA_BATCHES, METHODS


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"{key} not found in /proc/self/status; expected a Linux kernel.")


class PeakRSS:
    """Context manager: `.peak_mb` = peak RSS inside the block minus RSS at its start, in MiB."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.how = "VmHWM"

    def __enter__(self) -> "PeakRSS":
        _trim()
        self._start = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.how = "VmRSS sampled every 5 ms"
        self._stop = threading.Event()
        self._sampled = self._start
        if self.how != "VmHWM":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        peak = _status_kb("VmHWM") if self.how == "VmHWM" else max(self._sampled, _status_kb("VmRSS"))
        self.peak_mb = (peak - self._start) / 1024


def _trim() -> None:
    """Hand freed heap memory back to the OS so that the RSS baseline is not inflated by earlier frees."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 10% of steps, then linear decay to 0 (transformers' "linear" schedule)."""
    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, split, batch_size: int = 64, limit: int | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a split (its first `limit` examples if given)."""
    model.eval()
    order = torch.arange(len(split))
    if limit is not None and limit < len(split):  # evenly spaced, so every class is represented
        order = torch.linspace(0, len(split) - 1, limit).round().long()
    n = len(order)
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        out = model(**split.batch(idx))
        correct += int((out.logits.argmax(-1) == split.labels[idx]).sum())
        loss_sum += float(out.loss) * len(idx)
    model.train()
    return correct / n, loss_sum / n


def _load_model(path: str, num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the classification head's init
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model.train()


def _train(setup, train_split, batches, show_progress: bool, desc: str) -> tuple[list[float], list[float]]:
    """`batches`: index tensors into `train_split`, or ready batch dicts (the MLM task's masked batches)."""
    from tqdm.auto import tqdm

    model, optimizer = setup.model, setup.optimizer
    scheduler = linear_schedule(optimizer, len(batches))
    losses, times = [], []
    bar = tqdm(batches, desc=desc, disable=not show_progress, leave=False, dynamic_ncols=True)
    for idx in bar:
        start = time.perf_counter()
        loss = model(**(idx if isinstance(idx, dict) else train_split.batch(idx))).loss
        loss.backward()
        optimizer.step()
        if setup.after_step is not None:  # e.g. AdaLoRA's rank allocation, SoRA's proximal gate step
            setup.after_step(len(losses))
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise ValueError(f"{desc}: training loss became {losses[-1]} at step {len(losses)}; expected finite.")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, times


def _prepare(job: dict):
    """(setup, its PeakRSS, splits, data info, training batches) for a job: data, model and method set up."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    splits, info = load_splits(tokenizer, job["max_length"])
    train = splits["train"]
    task = job.get("task", "classify")
    batches = batch_indices(len(train), job["batch_size"], job["steps"], job["seed"])
    ga = batch_indices(len(train), job["batch_size"], GA_BATCHES, job["seed"] + 10_000)
    ga_batches = [train.batch(i) for i in ga]
    if task == "mlm":  # masks from the seed alone: the same for every method at one seed
        spec = mlm.mask_spec(tokenizer)
        batches = mlm.masked_batches(train, batches, spec, job["seed"])
        ga_batches = mlm.masked_batches(train, ga, spec, job["seed"] + 10_000)
        info["heldout"] = mlm.heldout_batches(splits[job["eval_split"]], spec, limit=job.get("eval_limit"))
    ctx = {"ga_batches": ga_batches, "batch_size": job["batch_size"], "task": task,
           "max_length": job["max_length"], "steps": job["steps"]}
    if task == "mlm":
        model = mlm.load_model(job["model_path"], job["seed"])
    else:
        model = _load_model(job["model_path"], len(info["classes"]), job["seed"])
    with PeakRSS() as setup_mem:
        setup = METHODS[job["method"]](model, job["lr"], ctx)
    torch.manual_seed(job["seed"])  # dropout
    return setup, setup_mem, splits, info, batches


MEMORY_PROBE_STEPS = 3
# glibc keeps freed heap blocks for reuse, so a process's RSS high-water mark depends on how its allocations
# happened to fragment. With a fixed mmap threshold every tensor above 64 KiB is its own mapping, returned to the
# OS when freed, and the RSS peak follows the live tensors. It slows allocation (page faults), so it is set only
# in the short memory probe, never in the timed run.
MEMORY_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_probe(job: dict) -> dict:
    """Peak RSS over the first MEMORY_PROBE_STEPS training steps of a job (run it in a fresh process started with
    MEMORY_PROBE_ENV): what gradients, optimizer state and activations add to the loaded model."""
    setup, _, splits, _, batches = _prepare({**job, "steps": MEMORY_PROBE_STEPS})
    # one forward+backward first (no optimizer step, gradients dropped): the kernels' one-time buffers then sit in
    # every method's baseline, not only in LoRA-GA's (whose setup already ran 8 such passes)
    first = batches[0] if isinstance(batches[0], dict) else splits["train"].batch(batches[0])
    setup.model(**first).loss.backward()
    setup.model.zero_grad(set_to_none=True)
    with PeakRSS() as mem:
        _train(setup, splits["train"], batches, False, job["method"])
    return {"method": job["method"], "seed": job["seed"], "peak_mb": mem.peak_mb, "how": mem.how}


def run_one(job: dict) -> dict:
    """Train `job["method"]` at `job["lr"]` for `job["steps"]` steps with seed `job["seed"]`; measure and evaluate.

    job keys: task ("classify", the default, or "mlm"), method, lr, seed, steps, batch_size, max_length, model_path,
    eval_split ("test" or "val"),
    eval_limit (None for all), threads (None: torch's default), progress (bool).
    """
    setup, setup_mem, splits, info, batches = _prepare(job)
    train = splits["train"]
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in setup.model.parameters())
    desc = f"{job['method']} lr={job['lr']:g} seed={job['seed']}"
    with PeakRSS() as train_mem:
        losses, times = _train(setup, train, batches, job.get("progress", True), desc)
    heldout = info.pop("heldout", None)
    if heldout is not None:  # MLM: masked-token accuracy and loss with the fixed held-out masks
        acc, eval_loss = mlm.evaluate(setup.model, heldout)
    else:
        acc, eval_loss = evaluate(setup.model, splits[job["eval_split"]], limit=job.get("eval_limit"))
    return {
        "method": job["method"], "lr": job["lr"], "seed": job["seed"], "losses": losses, "step_times": times,
        "setup_seconds": setup.setup_seconds, "setup_peak_mb": setup_mem.peak_mb, "train_peak_mb": train_mem.peak_mb,
        "memory_how": train_mem.how, "trainable": trainable, "total": total, "eval_split": job["eval_split"],
        "accuracy": acc, "eval_loss": eval_loss, "data": info, "notes": setup.notes,
    }
