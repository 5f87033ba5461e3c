"""LoRA-GA on 2 processes (gloo, CPU): per-rank memory of `estimate_gradient`'s fp32 gradient sums under DDP
(`reduce_to="all"`, `reduce_to="owner"`) and FSDP2 (`fully_shard`), against one process on the same global batches.

Every setup estimates on the same 4 global batches (one process: all 4; 2 processes: 2 each) of a random Llama
built from `LlamaConfig`, for the 7 projections of every block, then initialises LoRA-GA:

- one process: `estimate_gradient`, then `LoraGAContext` + `get_peft_model` (every SVD here);
- DDP, `reduce_to="all"` (the default): each rank sums its batches' full gradients, the means are all-reduced,
  every rank ends with all of them and runs every SVD;
- DDP, `reduce_to="owner"`: the same sums, then each target's mean is reduced onto its owner only; each SVD on its
  owner, A and B broadcast;
- FSDP2: inject, `fully_shard` each block and the model, estimate on the sharded model (each rank sums its shard of
  the gradient FSDP averaged), `initialise_adapter` (each SVD on its owner, gathered from the shards).

Columns: bytes of the running sums at their largest during the accumulation (read after every gradient hook), bytes
of the gradients a rank holds when `estimate_gradient` returns, as `rank 0 / rank 1`, and their ratio to one
process (largest rank); wall seconds of the estimation and of the init (largest rank). One thread per process.

    python benchmarks/bench_loraga_distributed.py            # width 512, 4 blocks, 4 batches of 4 x 128 tokens
    python benchmarks/bench_loraga_distributed.py --quick    # seconds: the code paths only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: idle OpenMP threads sleep

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import in_fresh_process, machine_line, markdown_table  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = ("single", "ddp_all", "ddp_owner", "fsdp2")
NAMES = {"single": "one process", "ddp_all": 'DDP, reduce_to="all" (default)',
         "ddp_owner": 'DDP, reduce_to="owner"', "fsdp2": "FSDP2 (fully_shard)"}


def build(job: dict):
    """(model, global batches, config), seeded: the same in every process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft import LoraGAConfig

    width = job["width"]
    config = LlamaConfig(vocab_size=job["vocab"], hidden_size=width, intermediate_size=int(2.6875 * width),
                         num_hidden_layers=job["layers"], num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), max_position_embeddings=1024,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(job["iters"]):
        ids = torch.randint(0, job["vocab"], (job["batch"], job["seq"]), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    lora = LoraGAConfig(r=job["rank"], lora_alpha=2 * job["rank"], use_rslora=True, target_modules=TARGETS,
                        iters=job["iters"])
    return model, batches, lora


def _held_bytes(grads: dict) -> int:
    unique = {id(g): g.to_local() if hasattr(g, "to_local") else g for g in grads.values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def measure(job: dict, setup: str, rank: int, world: int) -> dict:
    """Estimate + init for `setup` in this process (rank `rank` of `world`); bytes and seconds."""
    from peft import get_peft_model
    from peft.utils import lora_ga_utils
    from peft.utils.lora_ga_utils import LoraGAContext, estimate_gradient

    torch.set_num_threads(1)
    model, batches, config = build(job)
    share = len(batches) // world
    mine = batches[rank * share:(rank + 1) * share]
    peak = {"bytes": 0}
    original = lora_ga_utils._Accumulator.hook

    def hook(acc, param):  # the running sums' size after every gradient (they only grow)
        original(acc, param)
        peak["bytes"] = max(peak["bytes"], acc.nbytes())

    lora_ga_utils._Accumulator.hook = hook
    try:
        if setup == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="No LoraGAContext")
                model = get_peft_model(model, config)
            for block in model.base_model.model.model.layers:
                fully_shard(block)
            fully_shard(model)
        start = time.perf_counter()
        grads = estimate_gradient(model, mine, peft_config=config,
                                  reduce_to="owner" if setup == "ddp_owner" else "all")
        estimate_s = time.perf_counter() - start
    finally:
        lora_ga_utils._Accumulator.hook = original
    held = _held_bytes(grads)
    start = time.perf_counter()
    if setup == "fsdp2":
        model.base_model.initialise_adapter("default", grads)
    else:
        with LoraGAContext(model=model, named_grad=grads):
            get_peft_model(model, config)
    return {"peak": peak["bytes"], "held": held, "estimate_s": estimate_s, "init_s": time.perf_counter() - start}


def _worker(rank: int, world: int, init_file: str, job: dict, setup: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(measure(job, setup, rank, world), os.path.join(out_dir, f"{setup}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two(job: dict, setup: str) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), job, setup, tmp), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"{setup}_{r}.pt"), weights_only=True) for r in range(2)]


def _single(job: dict) -> dict:
    return measure(job, "single", 0, 1)


def run_all(args: argparse.Namespace) -> dict:
    job = {"width": args.width, "layers": args.layers, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
           "iters": 4, "rank": args.rank}
    results = {"single": [in_fresh_process(_single, job)]}
    for setup in SETUPS[1:]:
        print(f"  {setup} ...", file=sys.stderr, flush=True)
        results[setup] = run_two(job, setup)
    return {"job": job, "results": results}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report(result: dict, command: str) -> list[str]:
    job, results = result["job"], result["results"]
    ref = results["single"][0]
    rows = []
    for setup in SETUPS:
        ranks = results[setup]
        peak, held = [r["peak"] for r in ranks], [r["held"] for r in ranks]
        rows.append([NAMES[setup], str(len(ranks)), str(4 // len(ranks)), " / ".join(_mib(b) for b in peak),
                     f"{max(peak) / ref['peak']:.2f}", " / ".join(_mib(b) for b in held),
                     f"{max(held) / ref['held']:.2f}", f"{max(r['estimate_s'] for r in ranks):.2f}",
                     f"{max(r['init_s'] for r in ranks):.2f}"])
    return [
        "## LoRA-GA on 2 processes: per-rank gradient sums (DDP, FSDP2) vs one process", "", f"    {command}", "",
        f"Machine: {machine_line()}; gloo, one thread per process.", "",
        f"Llama width {job['width']}, {job['layers']} blocks, vocab {job['vocab']}; LoRA-GA r={job['rank']} on the 7 "
        f"projections of every block; 4 global batches of {job['batch']} x {job['seq']} tokens (2 processes: 2 "
        "each), fp32. Sums: fp32 running sums of `estimate_gradient`, at their largest during the accumulation; held: "
        "the gradients a rank holds when it returns (rank 0 / rank 1). Seconds: the largest rank's.", "",
        *markdown_table(["setup", "processes", "batches each", "sums MiB per rank", "/ one process",
                         "held MiB per rank", "/ one process", "estimate s", "init s"], rows), "",
        "Under DDP each rank computes whole gradients, so its sums are a whole model's during the accumulation "
        'whichever the reduction; `reduce_to="owner"` leaves each rank its own targets only after it. Under FSDP2 a '
        "rank only ever sums its shards. The seconds are one run each, first call included (a memory benchmark, "
        "not a timing one); the init column is the SVDs plus, on 2 processes, the gathers and broadcasts.", "",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="width 64, 2 blocks, 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.seq, args.vocab, args.rank = 64, 2, 16, 128, 4
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_loraga_distributed.py", *(sys.argv[1:] if argv is None else argv)])
    lines = report(run_all(args), command)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
