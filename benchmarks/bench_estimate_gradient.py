"""`estimate_gradient` (LoRA-GA's gradient estimation), plain and with block offload (`quant_flag=True`), against
the same number of plain forward+backward passes on the same batches, on random Llama models built from
`LlamaConfig` (CPU).

`forward+backward` = `model(**batch).loss.backward()` with every weight trainable (the passes a full fine-tuning
step makes, gradients zeroed between batches, no optimizer). `estimate_gradient` = the same passes with gradients on
the adaptable weights only (every Linear and the embedding), each batch's gradient added to an fp32 running sum and
`.grad` cleared at once. `offload` additionally runs every decoder block under activation checkpointing with the
blocks split in 4 chunks (bf16 -> nf4), moving chunks to the execution device on demand (on a CPU the moves are
no-ops, so this shows the recomputation cost and the activation memory saved).

Time: fastest of `--repeats` interleaved rounds (each variant once per round, same process). Memory: each variant in
its own fresh process, peak RSS during one call minus RSS with the model and batches loaded.

    python benchmarks/bench_estimate_gradient.py            # width 512, 4 blocks, 4 batches of 4 x 128 tokens
    python benchmarks/bench_estimate_gradient.py --quick    # seconds: the code path only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: idle OpenMP threads sleep

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import LIVE_MEMORY_ENV, PeakRSS, in_fresh_process, machine_line, markdown_table, median_seconds  # noqa: E402

VARIANTS = ("fwd_bwd", "estimate", "estimate_offload")
NAMES = {"fwd_bwd": "forward+backward (all weights trainable)", "estimate": "estimate_gradient",
         "estimate_offload": "estimate_gradient, quant_flag=True (offload)"}


def build(job: dict):
    """(model, batches) for one job, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    width = job["width"]
    config = LlamaConfig(
        vocab_size=job["vocab"], hidden_size=width, intermediate_size=int(2.6875 * width),
        num_hidden_layers=job["layers"], num_attention_heads=max(1, width // 64),
        num_key_value_heads=max(1, width // 64), max_position_embeddings=1024, tie_word_embeddings=False,
        attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(job["iters"]):
        ids = torch.randint(0, job["vocab"], (job["batch"], job["seq"]), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def runner(model, batches, variant: str):
    """A no-argument function running `variant` once over all batches."""
    from peft.utils.lora_ga_utils import estimate_gradient

    if variant == "fwd_bwd":
        model.train()

        def run() -> None:
            for batch in batches:
                model(**batch).loss.backward()
                model.zero_grad(set_to_none=True)

        return run
    offload = variant == "estimate_offload"
    return lambda: estimate_gradient(model, batches, quant_flag=offload, origin_type="bf16", quant_type="nf4",
                                     no_split_module_classes=["LlamaDecoderLayer"])


def time_interleaved(job: dict) -> dict[str, float]:
    torch.set_num_threads(job["threads"])
    model, batches = build(job)
    runs = {v: runner(model, batches, v) for v in VARIANTS}
    for run in runs.values():
        run()  # warm-up
    best = {v: float("inf") for v in VARIANTS}
    for _ in range(job["repeats"]):
        for v, run in runs.items():
            best[v] = min(best[v], median_seconds(run, warmup=0, repeats=1))
    return best


def measure_memory(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    model, batches = build(job)
    run = runner(model, batches, job["variant"])
    with PeakRSS() as mem:
        run()
    return {"peak_mb": mem.peak_mb, "how": mem.how}


def run_all(args: argparse.Namespace) -> dict:
    job = {"width": args.width, "layers": args.layers, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
           "iters": args.iters, "repeats": args.repeats, "threads": torch.get_num_threads()}
    times = in_fresh_process(time_interleaved, job)
    memory = {v: in_fresh_process(measure_memory, {**job, "variant": v}, env=LIVE_MEMORY_ENV) for v in VARIANTS}
    for v in VARIANTS:
        print(f"  {v}: {times[v]:.3f} s, {memory[v]['peak_mb']:.0f} MiB", file=sys.stderr)
    return {"job": job, "times": times, "memory": memory}


def report(result: dict, command: str) -> list[str]:
    job, times, memory = result["job"], result["times"], result["memory"]
    ref_t, ref_m = times["fwd_bwd"], max(memory["fwd_bwd"]["peak_mb"], 1e-9)
    rows = [[NAMES[v], f"{times[v]:.3f}", f"{times[v] / ref_t:.2f}", f"{memory[v]['peak_mb']:.0f}",
             f"{memory[v]['peak_mb'] / ref_m:.2f}"] for v in VARIANTS]
    return [
        "## LoRA-GA gradient estimation vs plain forward+backward", "", f"    {command}", "",
        f"Machine: {machine_line()}.", "",
        f"Llama width {job['width']}, {job['layers']} blocks, vocab {job['vocab']}, {job['iters']} batches of "
        f"{job['batch']} x {job['seq']} tokens, fp32. Time: fastest of {job['repeats']} interleaved rounds. Memory: "
        f"peak RSS of one call minus RSS with model and batches loaded, one fresh process per row "
        f"({memory['fwd_bwd']['how']}).", "",
        *markdown_table(["variant", "seconds", "time / fwd+bwd", "peak MiB", "mem / fwd+bwd"], rows), "",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="width 64, 2 blocks, 2 batches of 16 tokens, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.seq, args.iters, args.repeats, args.vocab = 64, 2, 16, 2, 1, 128
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_estimate_gradient.py", *(sys.argv[1:] if argv is None else argv)])
    lines = report(run_all(args), command)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
