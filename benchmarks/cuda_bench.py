"""GPU measurements: LoRA-GA's `estimate_gradient` (plain and block offload) and the LoRA-Pro optimizer step, on
a CUDA device, at sizes a CPU cannot run. Not part of `make bench` (which runs on the CPU); run it on a GPU machine:

    python benchmarks/cuda_bench.py                # writes its report on stdout (docs/benchmarks_gpu.md holds one)
    python benchmarks/cuda_bench.py --quick        # seconds: every code path (falls back to the CPU without CUDA)

1. `estimate_gradient` on a random bf16 Llama: the same batches through (a) plain forward+backward with every weight
   trainable (the model on the GPU), (b) `estimate_gradient` (model on the GPU), (c) `estimate_gradient(...,
   quant_flag=True)` with the model waiting on the CPU and run block by block on the GPU. Time: fastest of
   `--repeats` interleaved rounds (synchronised). Memory: `torch.cuda.max_memory_allocated` over one call,
   *absolute* (model weights included), since the point of the offload path is how much of the GPU it needs.
   A check line compares the offload gradients with the plain ones.
2. LoRA-Pro `optimizer.step()` (modes `full`, `efficient`) against torch's AdamW on the same LoRA model (bf16 base,
   fp32 adapters, rank 16 on every projection), and against AdamW over the adapted base weights themselves (what
   full fine-tuning of those weights costs in the optimizer). Time: median of `--steps` synchronised steps after 3
   warm-up steps. Memory: peak allocated during the first 3 steps (state creation included) minus the allocation
   before them; state: bytes of the moment tensors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's peft, not an installed one

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return f"CPU (no CUDA device), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class PeakCuda:
    """`with PeakCuda(device, absolute) as m: ...` then `m.mib`: peak allocated bytes inside the block (absolute, or
    minus the allocation at its start); 0 on a CPU."""

    def __init__(self, device: torch.device, absolute: bool) -> None:
        self.device, self.absolute, self.mib = device, absolute, 0.0

    def __enter__(self) -> "PeakCuda":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mib = (peak - (0 if self.absolute else self.start)) / MIB


def llama(width: int, layers: int, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(2.6875 * width),
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 128),
                         num_key_value_heads=max(1, width // 128), max_position_embeddings=4096,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _worst_relative(result: dict, reference: dict) -> float:
    """Largest relative Frobenius difference over the weights of two `estimate_gradient` results."""
    return max(((result[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)).item() for k in reference)


# --- 1. estimate_gradient -----------------------------------------------------------------------------------------
def estimate_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    from peft.utils.lora_ga_utils import estimate_gradient

    model = llama(args.eg_width, args.eg_layers, args.vocab, torch.bfloat16, device).to("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.eg_batches):
        ids = torch.randint(0, args.vocab, (args.eg_batch, args.eg_seq), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    on_dev = [{k: v.to(device) for k, v in b.items()} for b in batches]
    blocks = ["LlamaDecoderLayer"]

    def fwd_bwd() -> None:
        model.to(device).train()
        for batch in on_dev:
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)

    def plain() -> dict:
        model.to(device)
        return estimate_gradient(model, on_dev)

    def offload() -> dict:
        model.to("cpu")
        return estimate_gradient(model, batches, quant_flag=True, origin_type="bf16", quant_type="nf4",
                                 no_split_module_classes=blocks)

    runs = {"fwd_bwd": fwd_bwd, "plain": plain, "offload": offload}
    memory = {}
    for name, fn in runs.items():  # also the warm-up
        if name == "offload":
            model.to("cpu")
        else:
            model.to(device)
        with PeakCuda(device, absolute=True) as peak:
            result = fn()
        memory[name] = peak.mib
        if name == "plain":
            reference = result
            repeat = plain()  # run-to-run differences of the GPU kernels themselves (atomics in some backwards)
            noise = _worst_relative(repeat, reference)
            del repeat
        elif name == "offload":
            worst = _worst_relative(result, reference)
        print(f"  estimate {name}: {memory[name]:.0f} MiB", file=sys.stderr)
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            model.to("cpu" if name == "offload" else device)
            best[name] = min(best[name], timed(fn, device))
    model.to("cpu")
    names = {"fwd_bwd": "forward+backward (all weights trainable, model on the GPU)",
             "plain": "estimate_gradient (model on the GPU)",
             "offload": "estimate_gradient, quant_flag=True (model on the CPU, 4 chunks)"}
    rows = [[names[k], f"{best[k]:.3f}", f"{best[k] / best['fwd_bwd']:.2f}", f"{memory[k]:.0f}",
             f"{memory[k] / max(memory['fwd_bwd'], 1e-9):.2f}"] for k in runs]
    params = sum(p.numel() for p in model.parameters())
    return [
        "## LoRA-GA gradient estimation on a GPU", "",
        f"Llama bf16, width {args.eg_width}, {args.eg_layers} blocks, vocab {args.vocab} ({params / 1e6:.0f}M "
        f"parameters, {2 * params / MIB:.0f} MiB of weights), {args.eg_batches} batches of {args.eg_batch} x "
        f"{args.eg_seq} tokens. Time: fastest of {args.repeats} interleaved rounds. Peak: GPU memory allocated "
        "during one call, absolute (weights included; the fp32 gradient sums of the plain path live on the GPU, "
        "those of the offload path on the CPU).", "",
        *markdown_table(["variant", "seconds", "time / fwd+bwd", "peak GPU MiB", "peak / fwd+bwd"], rows), "",
        f"Check: the offload gradients equal the plain ones to a relative Frobenius error of at most {worst:.1e} "
        f"over all weights; two plain runs differ by up to {noise:.1e} (the GPU kernels' own run-to-run "
        "differences in bf16, e.g. atomics in the attention backward).", "",
    ]


# --- 2. LoRA-Pro optimizer step --------------------------------------------------------------------------------
def lorapro_model(width: int, args: argparse.Namespace, device: torch.device):
    from peft import LoraProConfig, get_peft_model

    base = llama(width, args.lp_layers, args.vocab, torch.bfloat16, device)
    model = get_peft_model(base, LoraProConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    ids = torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    return model


def optimizer_for(model, variant: str):
    from peft.optimizers import LoraProAdamW
    from peft.tuners.lora.layer import LoraLayer

    if variant == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if variant == "full_ft":  # AdamW over the adapted base weights (fp32 copies with gradients), no adapter
        weights = []
        for module in model.modules():
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight
                p = torch.nn.Parameter(w.detach().float())
                p.grad = torch.randn_like(p)
                weights.append(p)
        return torch.optim.AdamW(weights, lr=1e-4)
    return LoraProAdamW(model, lr=1e-4, mode=variant)


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for k, t in st.items()
               if k in ("exp_avg", "exp_avg_sq"))


def lorapro_rows(width: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = lorapro_model(width, args, device)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from peft.tuners.lora.layer import LoraLayer

    adapted = sum(m.get_base_layer().weight.numel() for m in model.modules() if isinstance(m, LoraLayer))
    out = []
    for variant in ("adamw", "full", "efficient", "full_ft"):
        grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
        optimizer = optimizer_for(model, variant)
        with PeakCuda(device, absolute=False) as peak:
            for _ in range(3):
                optimizer.step()
        times = []
        for _ in range(args.steps):
            times.append(timed(optimizer.step, device))
        out.append({"width": width, "variant": variant, "ms": 1000 * statistics.median(times), "peak": peak.mib,
                    "state": state_bytes(optimizer) / MIB, "params": adapted if variant == "full_ft" else lora})
        print(f"  lorapro width {width} {variant}: {out[-1]['ms']:.2f} ms, {peak.mib:.0f} MiB", file=sys.stderr)
        del optimizer
        for p, g in grads.items():  # the next variant steps from the same gradients
            p.grad = g
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def device_matches_cpu(device: torch.device) -> float:
    """Largest relative difference between the A/B factors after 3 `LoraProAdamW` steps (both modes) on `device`
    and on the CPU, from the same fp32 model and gradients."""
    import copy

    from peft import LoraProConfig, get_peft_model
    from peft.optimizers import LoraProAdamW

    worst = 0.0
    for mode in ("full", "efficient"):
        torch.manual_seed(0)
        cpu = get_peft_model(llama(256, 1, 512, torch.float32, torch.device("cpu")),
                             LoraProConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        for name, p in cpu.named_parameters():  # B != 0, so every branch of the adjustment runs
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        dev = copy.deepcopy(cpu).to(device)
        for model in (cpu, dev):
            ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1)).to(model.device)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer = LoraProAdamW(model, lr=1e-3, mode=mode)
            for _ in range(3):
                optimizer.step()
        for (name, a), (_, b) in zip(cpu.named_parameters(), dev.named_parameters()):
            if "lora_" in name:
                worst = max(worst, ((b.detach().cpu() - a.detach()).norm() / a.detach().norm()).item())
    return worst


def lorapro_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    names = {"adamw": "LoRA + torch AdamW", "full": "LoRA-Pro full", "efficient": "LoRA-Pro efficient",
             "full_ft": "AdamW on the adapted base weights (full fine-tuning's optimizer)"}
    rows = []
    for width in args.lp_widths:
        results = lorapro_rows(width, args, device)
        ref = results[0]
        for r in results:
            rows.append([str(width), names[r["variant"]], f"{r['params']:,}", f"{r['ms']:.2f}",
                         f"{r['ms'] / ref['ms']:.2f}", f"{r['peak']:.0f}", f"{r['state']:.1f}",
                         f"{r['state'] / max(ref['state'], 1e-9):.1f}"])
    return [
        "## LoRA-Pro optimizer step on a GPU", "",
        f"Llama, {args.lp_layers} blocks, bf16 base, fp32 adapters of rank {args.rank} (alpha {2 * args.rank}) on "
        f"q, k, v, o, gate, up, down (MLP 2.6875 x width). `optimizer.step()` only, median of {args.steps} steps "
        "after 3 warm-up steps (synchronised). Peak: GPU memory allocated during the first 3 steps minus the "
        "allocation before them. The last row of each width steps fp32 copies of the adapted base weights with "
        "torch's AdamW: the optimizer cost of full fine-tuning of the same weights.", "",
        *markdown_table(["width", "optimizer", "params stepped", "ms/step", "time / LoRA AdamW", "peak MiB",
                         "state MiB", "state / LoRA AdamW"], rows), "",
        f"Check: 3 `LoraProAdamW` steps (full and efficient) on this device give the CPU's A and B to a relative "
        f"error of at most {device_matches_cpu(device):.1e} (fp32, width 256, rank 8, B non-zero).", "",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eg-width", type=int, default=2048)
    p.add_argument("--eg-layers", type=int, default=8)
    p.add_argument("--eg-batches", type=int, default=4)
    p.add_argument("--eg-batch", type=int, default=4)
    p.add_argument("--eg-seq", type=int, default=512)
    p.add_argument("--lp-widths", default="2048,4096")
    p.add_argument("--lp-layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", choices=["estimate", "lorapro"], default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: the code paths only")
    args = p.parse_args(argv)
    if args.quick:
        args.eg_width, args.eg_layers, args.eg_batches, args.eg_batch, args.eg_seq = 128, 4, 2, 2, 16
        args.lp_widths, args.lp_layers, args.rank, args.vocab, args.repeats, args.steps = "128", 1, 4, 256, 1, 2
    args.lp_widths = [int(w) for w in str(args.lp_widths).split(",")]
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    command = " ".join(["python benchmarks/cuda_bench.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["# GPU benchmarks", "", f"    {command}", "", f"Device: {device_line(device)}.", ""]
    if args.only in (None, "estimate"):
        lines += estimate_section(args, device)
    if args.only in (None, "lorapro"):
        lines += lorapro_section(args, device)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
