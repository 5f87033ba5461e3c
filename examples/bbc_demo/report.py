"""Summaries of the demo's runs: the printed table, `docs/results.md`, the loss-curve PNG, and the check of the
papers' claims against the numbers just measured."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

from .methods import LABELS

SMOOTH = 5  # "train loss at step k" = mean training loss over steps k-4..k


def checkpoints(steps: int) -> list[int]:
    """The steps at which the table reports the training loss: 10%, 25%, 50% and 100% of the budget."""
    points = sorted({max(SMOOTH, round(steps * f)) for f in (0.1, 0.25, 0.5, 1.0)})
    return [p for p in points if p <= steps] or [steps]


def loss_at(losses: list[float], step: int) -> float:
    window = losses[max(0, step - SMOOTH):step]
    return sum(window) / len(window)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict], steps: int) -> list[dict]:
    """One row per method (in first-seen order), averaged over seeds."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        row = {"method": method, "label": LABELS.get(method, method), "lr": runs[0]["lr"], "seeds": len(runs)}
        row["loss"] = {k: _mean_std([loss_at(r["losses"], k) for r in runs]) for k in checkpoints(steps)}
        row["accuracy"] = _mean_std([r["accuracy"] for r in runs])
        row["eval_loss"] = _mean_std([r["eval_loss"] for r in runs]) if all("eval_loss" in r for r in runs) else None
        row["sec_per_step"] = statistics.fmean(statistics.fmean(r["step_times"][1:] or r["step_times"]) for r in runs)
        row["train_peak_mb"] = max(r["train_peak_mb"] for r in runs)
        row["setup_seconds"] = statistics.fmean(r["setup_seconds"] for r in runs)
        row["setup_peak_mb"] = max(r["setup_peak_mb"] for r in runs)
        row["trainable"] = runs[0]["trainable"]
        row["curve"] = [statistics.fmean(v) for v in zip(*(r["losses"] for r in runs))]
        rows.append(row)
    return rows


def _fmt(ms: tuple[float, float], digits: int, pct: bool = False) -> str:
    mean, std = (ms[0] * 100, ms[1] * 100) if pct else ms
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def table_lines(rows: list[dict], steps: int, acc_name: str = "test acc %") -> list[str]:
    """A Markdown table (also what the demo prints)."""
    ks = checkpoints(steps)
    head = ["method", "lr"] + [f"loss@{k}" for k in ks] + [
        "held-out loss", acc_name, "s/step", "train peak MiB", "setup s", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], f"{row['lr']:g}"] + [_fmt(row["loss"][k], 3) for k in ks] + [
            _fmt(row["eval_loss"], 3) if row.get("eval_loss") else "-", _fmt(row["accuracy"], 1, pct=True),
            f"{row['sec_per_step']:.2f}", f"{row['train_peak_mb']:.0f}",
            f"{row['setup_seconds']:.1f}", f"{row['trainable']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def early_loss(curve: list[float]) -> float:
    """Mean training loss over the first half of the steps (the area under the early curve, per step)."""
    half = curve[: max(1, len(curve) // 2)]
    return sum(half) / len(half)


def curve_gap(curve: list[float], reference: list[float]) -> float:
    """Mean |loss - reference loss| at every step k whose SMOOTH-step window (steps k-SMOOTH..k-1, 0-based) lies after
    the first 10% of the steps (the warm-up)."""
    n = min(len(curve), len(reference))
    steps = range(min(n // 10 + SMOOTH, n), n + 1)
    return sum(abs(loss_at(curve, k) - loss_at(reference, k)) for k in steps) / len(steps)


def _verdict(wins: int, total: int) -> str:
    return "supported" if wins == total else ("not supported" if wins == 0 else "mixed")


def claims(rows: list[dict], steps: int) -> list[str]:
    """Plain statements of what these numbers say about the two papers' claims (only for methods that ran).

    LoRA-GA "converges faster early": its mean training loss over the first half of the steps and its loss at the
    first two checkpoints, each against LoRA's. LoRA-Pro "is closer to full fine-tuning than LoRA": the mean gap
    between its loss curve and full fine-tuning's, and the gap in final training loss, each against LoRA's."""
    by = {r["method"]: r for r in rows}
    out = []
    if "loraga" in by and "lora" in by:
        ga, lo = by["loraga"], by["lora"]
        pts = checkpoints(steps)[:2]
        tests = [(early_loss(ga["curve"]), early_loss(lo["curve"]))] + [(ga["loss"][k][0], lo["loss"][k][0])
                                                                         for k in pts]
        verdict = _verdict(sum(a < b for a, b in tests), len(tests))
        at = "; ".join(f"at step {k} {a:.3f} vs {b:.3f}" for k, (a, b) in zip(pts, tests[1:]))
        out.append(f"- LoRA-GA converges faster early than LoRA: **{verdict}** here (mean train loss over the "
                   f"first {steps // 2} steps: LoRA-GA {tests[0][0]:.3f} vs LoRA {tests[0][1]:.3f}; {at}).")
    if "full" in by and "lora" in by:
        full, lora = by["full"], by["lora"]
        full_loss, lora_loss = full["loss"][steps][0], lora["loss"][steps][0]
        lora_gap = curve_gap(lora["curve"], full["curve"])
        for key in ("lorapro_full", "lorapro_efficient"):
            if key not in by:
                continue
            pro = by[key]
            pro_loss, pro_gap = pro["loss"][steps][0], curve_gap(pro["curve"], full["curve"])
            wins = (pro_gap < lora_gap) + (abs(pro_loss - full_loss) < abs(lora_loss - full_loss))
            out.append(
                f"- {LABELS[key]} is closer to full fine-tuning than LoRA: **{_verdict(wins, 2)}** here (mean gap "
                f"to full fine-tuning's loss curve: {LABELS[key]} {pro_gap:.3f} vs LoRA {lora_gap:.3f}; final train "
                f"loss full {full_loss:.3f}, LoRA {lora_loss:.3f}, {LABELS[key]} {pro_loss:.3f}; test accuracy full "
                f"{100 * full['accuracy'][0]:.1f}%, LoRA {100 * lora['accuracy'][0]:.1f}%, "
                f"{LABELS[key]} {100 * pro['accuracy'][0]:.1f}%).")
    return out


def machine_lines() -> list[str]:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [f"- CPU: {cpu}, {cores} cores available to the process (torch threads: {torch.get_num_threads()})",
            f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"]


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        curve = row["curve"]
        smooth = [loss_at(curve, k) for k in range(1, len(curve) + 1)]
        ax.plot(range(1, len(curve) + 1), smooth, label=f"{row['label']} (lr {row['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (mean of last {SMOOTH} steps)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
