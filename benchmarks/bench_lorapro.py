"""LoRA-Pro optimizer step (`LoraProAdamW`, modes `full` and `efficient`) against torch's AdamW on the same LoRA
model, at two widths, on tiny random Llama models built from `LlamaConfig` (CPU).

What is measured is the optimizer step alone (`optimizer.step()`), on gradients from one real forward + backward:
- time: for each width, one fresh process builds the three variants (same model, same gradients) and runs their
  steps in turn, `--repeats` rounds after 2 warm-up steps each (so B is no longer zero); fastest step per variant;
- memory: each (width, variant) in its own fresh process, the peak RSS over the first 3 steps (which create the
  optimizer state) minus the RSS before them, and the optimizer state's bytes (`exp_avg` + `exp_avg_sq`).

    python benchmarks/bench_lorapro.py                 # widths 512, 1024; rank 16
    python benchmarks/bench_lorapro.py --quick         # seconds: the code path only
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

VARIANTS = ("adamw", "full", "efficient")
NAMES = {"adamw": "LoRA + torch AdamW", "full": "LoRA-Pro full", "efficient": "LoRA-Pro efficient"}
PEAK_RESOLUTION_MB = 0.1  # RSS moves in pages and allocator chunks: a smaller reference peak is not a ratio's base
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(job: dict):
    """A random Llama (hidden `width`, MLP 2.6875 x width, heads of 64) with a LoRA-Pro adapter and gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft import LoraProConfig, get_peft_model

    width = job["width"]
    config = LlamaConfig(vocab_size=job["vocab"], hidden_size=width, intermediate_size=int(2.6875 * width),
                         num_hidden_layers=job["layers"], num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraProConfig(r=job["rank"], lora_alpha=2 * job["rank"], target_modules=TARGETS))
    ids = torch.randint(0, job["vocab"], (job["batch"], job["seq"]), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return model


def optimizer_for(model, variant: str):
    from peft.optimizers import LoraProAdamW

    if variant == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return LoraProAdamW(model, lr=1e-4, mode=variant)


def state_bytes(optimizer) -> int:
    """Bytes of the moment tensors (`exp_avg`, `exp_avg_sq`; step counters left out)."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for k, t in st.items()
               if k in ("exp_avg", "exp_avg_sq"))


def time_interleaved(job: dict) -> dict[str, float]:
    """Fastest optimizer step per variant, one step of each in turn per round, all in this process."""
    import copy

    torch.set_num_threads(job["threads"])
    base = build(job)
    steps = {}
    for variant in VARIANTS:
        model = copy.deepcopy(base)
        for src, dst in zip(base.parameters(), model.parameters()):  # deepcopy drops .grad
            dst.grad = None if src.grad is None else src.grad.clone()
        steps[variant] = optimizer_for(model, variant).step
    for step in steps.values():
        step()
        step()
    best = {v: float("inf") for v in VARIANTS}
    for _ in range(job["repeats"]):
        for v, step in steps.items():
            best[v] = min(best[v], median_seconds(step, warmup=0, repeats=1))
    return best


def measure_memory(job: dict) -> dict:
    """Peak RSS of the first 3 steps of one variant (fresh process), and its optimizer state bytes."""
    torch.set_num_threads(job["threads"])
    model = build(job)
    optimizer = optimizer_for(model, job["variant"])
    with PeakRSS() as mem:
        for _ in range(3):
            optimizer.step()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**job, "peak_mb": mem.peak_mb, "how": mem.how, "state_mb": state_bytes(optimizer) / 2**20,
            "trainable": lora}


def run(args: argparse.Namespace) -> list[dict]:
    base = {"layers": args.layers, "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "rank": args.rank,
            "repeats": args.repeats, "threads": torch.get_num_threads()}
    results = []
    for width in args.widths:
        job = {**base, "width": width}
        times = in_fresh_process(time_interleaved, job)
        for variant in VARIANTS:
            result = in_fresh_process(measure_memory, {**job, "variant": variant}, env=LIVE_MEMORY_ENV)
            result["seconds"] = times[variant]
            results.append(result)
            print(f"  width {width} {variant}: {1000 * result['seconds']:.1f} ms, {result['peak_mb']:.0f} MiB peak, "
                  f"{result['state_mb']:.1f} MiB state", file=sys.stderr)
    return results


def ratio(value: float, reference: float, resolution: float = 0.0) -> str:
    """`value / reference` with 2 decimals, or "n/a" when the reference is at or below the measurement's resolution
    (a peak RSS of 0 MiB for AdamW's tiny state would give a meaningless ratio)."""
    return "n/a" if reference <= resolution else f"{value / reference:.2f}"


def report(results: list[dict], args: argparse.Namespace, command: str) -> list[str]:
    rows = []
    for r in results:
        ref = next(x for x in results if x["width"] == r["width"] and x["variant"] == "adamw")
        rows.append([str(r["width"]), NAMES[r["variant"]], f"{r['trainable']:,}", f"{1000 * r['seconds']:.2f}",
                     ratio(r["seconds"], ref["seconds"]), f"{r['peak_mb']:.1f}",
                     ratio(r["peak_mb"], ref["peak_mb"], PEAK_RESOLUTION_MB), f"{r['state_mb']:.2f}",
                     ratio(r["state_mb"], ref["state_mb"])])
    header = ["width", "optimizer", "LoRA params", "ms/step", "time / AdamW", "peak MiB", "peak / AdamW",
              "state MiB", "state / AdamW"]
    return [
        "## LoRA-Pro optimizer step (full, efficient) vs AdamW on the same LoRA model", "", f"    {command}", "",
        f"Machine: {machine_line()}.", "",
        f"Llama, {args.layers} blocks, rank {args.rank} (alpha {2 * args.rank}) on q, k, v, o, gate, up, down; "
        f"fp32. `optimizer.step()` only, on the gradients of one batch of {args.batch} x {args.seq} tokens. Time: "
        f"fastest of {args.repeats} interleaved rounds (same process, after 2 warm-up steps). Peak: RSS high-water "
        f"mark over the first 3 steps (state creation included) minus the RSS before, one fresh process per row "
        f"({results[0]['how']}; a ratio is n/a where AdamW's peak is under {PEAK_RESOLUTION_MB} MiB). State: bytes "
        "of the optimizer's moment tensors.", "",
        *markdown_table(header, rows), "",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="512,1024")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="width 64, rank 4, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.rank, args.repeats, args.seq, args.vocab = "64", 4, 1, 8, 128
    args.widths = [int(w) for w in str(args.widths).split(",")]
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_lorapro.py", *(sys.argv[1:] if argv is None else argv)])
    lines = report(run(args), args, command)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
