"""LoRA-Pro full mode on several processes: the optimizer state each rank holds, unsharded (DDP) against sharded
(DDP with `shard_moments=True`, and FSDP2), at world size 2 on a small Llama-shaped model (CPU, gloo), and the
same arithmetic for Llama-2-7B on 8 GPUs.

Each configuration is one `torch.multiprocessing.spawn` of 2 fresh processes (gloo, `file://` rendezvous): each
rank builds the same seeded model, wraps it (DDP, or `fully_shard` on every decoder layer and the model), runs one
forward + backward on its half of the batch, then 3 `optimizer.step()` calls on those gradients (the first creates
the state). Per rank: the bytes of its moment tensors (`exp_avg`, `exp_avg_sq`: this rank's rows of a DTensor under
FSDP2), and the peak RSS over the 3 steps minus the RSS before them (`_measure.PeakRSS`, with `LIVE_MEMORY_ENV`).

    python benchmarks/bench_lorapro_sharded.py                # width 512, 2 layers, rank 16
    python benchmarks/bench_lorapro_sharded.py --quick        # seconds: the code path only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: idle OpenMP threads sleep

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import LIVE_MEMORY_ENV, PeakRSS, machine_line, markdown_table  # noqa: E402

WORLD = 2
CONFIGS = {"ddp": "DDP, unsharded", "ddp-shard": "DDP, shard_moments=True", "fsdp2": "FSDP2 (fully_shard)"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-2-7B: (out, in) of each adapted linear layer, 32 decoder layers
LLAMA2_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
             "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
LLAMA2_7B_LAYERS = 32


def build(job: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft import LoraProConfig, get_peft_model

    width = job["width"]
    config = LlamaConfig(vocab_size=job["vocab"], hidden_size=width, intermediate_size=int(2.6875 * width),
                         num_hidden_layers=job["layers"], num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), tie_word_embeddings=False)
    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(config), LoraProConfig(r=job["rank"], lora_alpha=2 * job["rank"],
                                                                  target_modules=TARGETS, mode="full"))


def _wrap(model, config: str):
    """(the module to run forward, the optimizer's keyword arguments) for a configuration."""
    if config == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, {}
    return torch.nn.parallel.DistributedDataParallel(model), {"shard_moments": config == "ddp-shard"}


def state_bytes(optimizer) -> int:
    """Bytes of this rank's moment tensors (a DTensor's local rows)."""
    from peft.optimizers.sharding import local

    return sum(local(t).numel() * local(t).element_size() for st in optimizer.state.values() for k, t in st.items()
               if k in ("exp_avg", "exp_avg_sq"))


def _rank(rank: int, job: dict, out: str) -> None:
    import torch.distributed as dist

    from peft.optimizers import LoraProAdamW

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.init", rank=rank, world_size=WORLD)
    try:
        model = build(job)
        forward, kwargs = _wrap(model, job["config"])
        ids = torch.randint(0, job["vocab"], (WORLD * job["batch"], job["seq"]),
                            generator=torch.Generator().manual_seed(0))[rank * job["batch"]:(rank + 1) * job["batch"]]
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer = LoraProAdamW(model, lr=1e-4, **kwargs)
        dist.barrier()
        with PeakRSS() as mem:
            for _ in range(3):
                optimizer.step()
        torch.save({"state": state_bytes(optimizer), "peak_mb": mem.peak_mb, "how": mem.how}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def measure(job: dict) -> list[dict]:
    """One spawn of `WORLD` fresh processes for `job`: each rank's state bytes and peak."""
    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in LIVE_MEMORY_ENV}
    os.environ.update(LIVE_MEMORY_ENV)  # read by the new interpreters at start-up
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rank")
            mp.spawn(_rank, args=(job, out), nprocs=WORLD, join=True)
            return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def llama2_7b_lines(world: int = 8) -> list[str]:
    """fp32 full-mode moments of Llama-2-7B with every projection adapted: total, and per rank sharded."""
    from peft.optimizers.zero import assign_owners

    shapes = [shape for _ in range(LLAMA2_7B_LAYERS) for shape in LLAMA2_7B.values()]
    numbers = [m * n for m, n in shapes]
    total = 2 * 4 * sum(numbers)  # exp_avg + exp_avg_sq, fp32
    owners = assign_owners(numbers, world)
    zero_max = max(2 * 4 * sum(x for x, k in zip(numbers, owners) if k == rank) for rank in range(world))
    fsdp_max = 2 * 4 * sum(-(-m // world) * n for m, n in shapes)  # ceil(m / world) rows of every layer
    per_layer = sum(m * n for m, n in LLAMA2_7B.values())
    gb = 1e9
    return [
        f"Llama-2-7B, full mode on q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down (4096 x 11008), "
        f"{LLAMA2_7B_LAYERS} layers: {per_layer:,} m n numbers per layer, {sum(numbers):,} in all; fp32 moments "
        f"2 x 4 bytes x m x n = **{total / gb:.1f} GB** ({total / 2**30:.1f} GiB) on every rank unsharded (DDP). "
        f"At world size {world}: **{total / world / gb:.3f} GB** per rank ideally; `shard_moments=True` "
        f"(whole layers, largest first to the least-loaded rank) gives at most {zero_max / gb:.3f} GB on a rank; "
        f"FSDP2 (every layer's rows split {world} ways) {fsdp_max / gb:.3f} GB on every rank.", "",
    ]


def report(results: dict[str, list[dict]], args: argparse.Namespace, command: str) -> list[str]:
    unsharded = sum(r["state"] for r in results["ddp"]) / WORLD  # each DDP rank holds all of it
    rows = []
    for config, ranks in results.items():
        states = [r["state"] for r in ranks]
        rows.append([CONFIGS[config], *(f"{s / 2**20:.2f}" for s in states), f"{max(states) / unsharded:.3f}",
                     *(f"{r['peak_mb']:.1f}" for r in ranks)])
    header = ["configuration", *(f"state MiB rank {k}" for k in range(WORLD)), "max state / unsharded",
              *(f"peak MiB rank {k}" for k in range(WORLD))]
    width = args.width
    return [
        "## LoRA-Pro full mode sharded across ranks (DDP shard_moments, FSDP2) vs unsharded", "", f"    {command}", "",
        f"Machine: {machine_line()}.", "",
        f"World size {WORLD} (gloo, one process per rank, 1 thread each). Llama, hidden {width}, MLP "
        f"{int(2.6875 * width)}, {args.layers} blocks, rank {args.rank} (alpha {2 * args.rank}) on q, k, v, o, gate, "
        f"up, down; fp32; `LoraProAdamW(mode=\"full\")`. State: bytes of the moment tensors a rank holds. Peak: RSS "
        f"high-water mark over 3 `optimizer.step()` calls on one batch's gradients (state creation included) minus "
        f"the RSS before ({results['ddp'][0]['how']}).", "",
        *markdown_table(header, rows), "",
        *llama2_7b_lines(), ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="width 64, rank 4")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.rank, args.seq, args.vocab = 64, 4, 8, 128
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_lorapro_sharded.py", *(sys.argv[1:] if argv is None else argv)])
    job = {"width": args.width, "rank": args.rank, "layers": args.layers, "vocab": args.vocab, "batch": args.batch,
           "seq": args.seq}
    results = {}
    for config in CONFIGS:
        results[config] = measure({**job, "config": config})
        print(f"  {config}: " + ", ".join(f"rank {k} {r['state'] / 2**20:.2f} MiB state, {r['peak_mb']:.1f} MiB peak"
                                          for k, r in enumerate(results[config])), file=sys.stderr)
    lines = report(results, args, command)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
