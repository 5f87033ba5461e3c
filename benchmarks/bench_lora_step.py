"""LoRA training step against the same model with no adapter (frozen, forward + backward) and against full
fine-tuning, at several widths and ranks, on tiny Llama models built from `LlamaConfig` (CPU, random weights).

Time: for each width, one fresh process builds every variant and runs one step of each in turn, `--repeats`
rounds after 2 warm-up steps each, and keeps each variant's fastest step (interleaving makes a burst of load on a
shared machine hit all variants alike; the minimum is the least disturbed sample). A step is forward + backward
(+ AdamW step and zero_grad where something trains). Memory: each (width, variant) in its own fresh process, the
peak RSS over 3 steps (optimizer state created at the first) minus the RSS with the model loaded. LoRA targets
every linear layer of the blocks (q, k, v, o, gate, up, down) with alpha = 2r.

    python benchmarks/bench_lora_step.py                     # widths 256, 512, 1024; ranks 4, 16, 64
    python benchmarks/bench_lora_step.py --quick             # seconds: the code path only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep rather than spin (the 2 cores are shared; spinning makes timings erratic). Set before
# torch loads; the spawned measuring processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import LIVE_MEMORY_ENV, PeakRSS, in_fresh_process, machine_line, markdown_table, median_seconds  # noqa: E402

NAMES = {"frozen": "no adapter (frozen)", "full": "full fine-tuning"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llama(width: int, layers: int, vocab: int):
    """A random Llama: hidden `width`, MLP `int(2.6875 * width)` (Llama's 11008/4096), heads of 64, `layers` blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=int(2.6875 * width), num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
        max_position_embeddings=512, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def prepare(model, variant: str, rank: int):
    """(model, optimizer or None) for `variant` in frozen / full / lora."""
    if variant == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer, as LoRA needs, but no weight gradient
        return model, None
    if variant == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def _step_fn(job: dict, variant: str, rank: int):
    """(model, step function) for one variant on the job's width, seeded identically."""
    model, optimizer = prepare(build_llama(job["width"], job["layers"], job["vocab"]), variant, rank)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, job["vocab"], (job["batch"], job["seq"]), generator=gen)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return model, step


def measure(job: dict) -> dict:
    """Memory of one variant (in its own process): peak MiB over 3 steps, trainable and total parameters."""
    torch.set_num_threads(job["threads"])
    model, step = _step_fn(job, job["variant"], job["rank"])
    with PeakRSS() as mem:
        seconds = median_seconds(step, warmup=1, repeats=2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**job, "seconds": seconds, "peak_mb": mem.peak_mb, "memory_how": mem.how, "trainable": trainable,
            "total": sum(p.numel() for p in model.parameters())}


def time_interleaved(job: dict, variants: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
    """Step time of every variant of one width, measured in one process, one step of each in turn per round (so a
    burst of load on the shared machine hits all variants alike); the minimum over `repeats` rounds."""
    torch.set_num_threads(job["threads"])
    steps = {v: _step_fn(job, *v)[1] for v in variants}
    for step in steps.values():  # warm-up (and the optimizer state)
        step()
        step()
    best = {v: float("inf") for v in variants}
    for _ in range(job["repeats"]):
        for v, step in steps.items():
            best[v] = min(best[v], median_seconds(step, warmup=0, repeats=1))
    return best


def run(args: argparse.Namespace) -> list[dict]:
    base = {"layers": args.layers, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "rank": 0}
    results = []
    for width in args.widths:
        variants = [("frozen", 0), ("full", 0)] + [("lora", r) for r in args.ranks]
        job = {**base, "width": width}
        times = in_fresh_process(time_interleaved, job, variants)
        for variant, rank in variants:
            result = in_fresh_process(measure, {**job, "variant": variant, "rank": rank}, env=LIVE_MEMORY_ENV)
            result["seconds"] = times[(variant, rank)]
            results.append(result)
            print(f"  width {width} {variant}{rank or ''}: {result['seconds']:.3f} s, {result['peak_mb']:.0f} MiB",
                  file=sys.stderr)
    return results


def report(results: list[dict], args: argparse.Namespace, command: str) -> list[str]:
    rows = []
    for r in results:
        same = [x for x in results if x["width"] == r["width"]]
        ref = {v: next(x for x in same if x["variant"] == v) for v in ("frozen", "full")}
        name = f"LoRA r={r['rank']}" if r["variant"] == "lora" else NAMES[r["variant"]]
        rows.append([str(r["width"]), name, f"{r['trainable']:,}", f"{1000 * r['seconds']:.0f}",
                     f"{r['seconds'] / ref['frozen']['seconds']:.2f}", f"{r['seconds'] / ref['full']['seconds']:.2f}",
                     f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / max(ref['frozen']['peak_mb'], 1e-9):.2f}",
                     f"{r['peak_mb'] / max(ref['full']['peak_mb'], 1e-9):.2f}"])
    header = ["width", "variant", "trainable", "ms/step", "time / frozen", "time / full", "peak MiB",
              "mem / frozen", "mem / full"]
    return [
        "## LoRA training step vs no adapter and vs full fine-tuning", "", f"    {command}", "",
        f"Machine: {machine_line()}.", "",
        f"Llama, {args.layers} blocks, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, fp32. Time: "
        f"fastest of {args.repeats} interleaved rounds (one step of each variant per round, same process). Memory: "
        f"peak RSS over 3 steps minus RSS with the model loaded, one fresh process per row "
        f"({results[0]['memory_how']}). `frozen` = forward + backward with every weight frozen (input gradients on, "
        "so backward runs through all blocks); `full` and LoRA include the AdamW step.", "",
        *markdown_table(header, rows), "",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="256,512,1024")
    p.add_argument("--ranks", default="4,16,64")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="width 64, rank 4, 1 repeat, 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.ranks, args.repeats, args.seq, args.vocab = "64", "4", 1, 16, 128
    args.widths = [int(w) for w in str(args.widths).split(",")]
    args.ranks = [int(r) for r in str(args.ranks).split(",")]
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_lora_step.py", *(sys.argv[1:] if argv is None else argv)])
    lines = report(run(args), args, command)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
