"""The demo's learning-rate sweep: each method at every rate of its grid (`SWEEP_LRS`), trained on the train split
and scored by validation loss. Finished runs are kept in `docs/lr_sweep.json` (one record per method, rate, seed
and setting), so the sweep can be run a few methods at a time and resumed; `docs/lr_sweep.md` is rewritten from
all the records that match the current setting each time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import report
from .methods import LABELS, METHODS, SWEEP_LRS

SETTING = ("steps", "batch_size", "max_length", "eval_limit")


def _key(rec: dict) -> tuple:
    return (rec["method"], float(rec["lr"]), rec["seed"], *(rec[k] for k in SETTING))


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text())["runs"]


def run_sweep(jobs: list[dict], run_jobs: Callable[[list[dict]], list[dict]], path: Path | None,
              command: str) -> list[dict]:
    """Run the jobs not already recorded in `path` (None: run all, record nothing); return every matching record."""
    records = load_records(path) if path else []
    done = {_key(r) for r in records}
    todo = [j for j in jobs if _key(j) not in done]
    for job in todo:  # one at a time, recorded as soon as it finishes
        (result,) = run_jobs([job])
        records.append({"method": job["method"], "lr": job["lr"], "seed": job["seed"],
                        **{k: job[k] for k in SETTING}, "eval_loss": result["eval_loss"],
                        "accuracy": result["accuracy"], "final_loss": report.loss_at(result["losses"], job["steps"]),
                        "command": command})
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"runs": records}, indent=1))
    wanted = {_key(j) for j in jobs}
    return [r for r in records if _key(r) in wanted]


def table(records: list[dict]) -> tuple[list[str], dict[str, float]]:
    """Markdown rows (method, lr, mean val loss, val acc, final train loss, chosen) and the chosen rate per method."""
    lines = ["| method | lr | val loss | val acc % | final train loss | chosen |", "|---|---|---|---|---|---|"]
    chosen = {}
    for m in [m for m in METHODS if any(r["method"] == m for r in records)]:
        by_lr: dict[float, list[dict]] = {}
        for r in sorted((r for r in records if r["method"] == m), key=lambda r: r["lr"]):
            by_lr.setdefault(r["lr"], []).append(r)
        score = {lr: sum(r["eval_loss"] for r in rs) / len(rs) for lr, rs in by_lr.items()}
        chosen[m] = min(score, key=score.get)
        for lr, rs in by_lr.items():
            acc = 100 * sum(r["accuracy"] for r in rs) / len(rs)
            final = sum(r["final_loss"] for r in rs) / len(rs)
            edge = " (grid edge)" if lr == chosen[m] and lr in (min(by_lr), max(by_lr)) else ""
            lines.append(f"| {LABELS[m]} | {lr:g} | {score[lr]:.4f} | {acc:.1f} | {final:.3f} | "
                         f"{'**yes**' + edge if lr == chosen[m] else ''} |")
    return lines, chosen


def write_markdown(path: Path, records: list[dict], setting: dict, seeds: list[int]) -> list[str]:
    lines, chosen = table(records)
    commands = sorted({r["command"] for r in records})
    text = [
        "# Learning-rate sweep for the demo", "",
        "Written by `python examples/demo_bbc_minilm.py --sweep ...`; runs recorded in "
        f"`{path.with_suffix('.json').name}`.", "",
        "Commands that produced these runs:", "", *[f"    {c}" for c in commands], "", *report.machine_lines(), "",
        f"{setting['steps']} steps, batch {setting['batch_size']} x {setting['max_length']} tokens, seeds {seeds}; "
        "each run trains on the train split and is scored on the validation split (disjoint from train and test); "
        "the rate with the lowest mean validation loss is chosen. The grid is `SWEEP_LRS` (MLM: `MLM_SWEEP_LRS`) in "
        "`examples/bbc_demo/methods.py` (factors of about 3).", "",
        *lines, "",
        "Chosen: " + ", ".join(f"{LABELS[m]} {lr:g}" for m, lr in chosen.items()) + ".", "",
    ]
    path.write_text("\n".join(text))
    return lines


def grid_jobs(methods: list[str], seeds: list[int], make_job: Callable[[str, float, int], dict],
              grid: dict[str, list[float]] | None = None) -> list[dict]:
    grid = SWEEP_LRS if grid is None else grid
    return [make_job(m, lr, s) for m in methods for lr in grid[m] for s in seeds]
