"""`benchmarks/bench_lorapro.py`'s code path in-process on a tiny model (the real run spawns a process per row)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_lorapro_measures_and_reports():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    bench = importlib.import_module("bench_lorapro")
    job = {"width": 32, "layers": 1, "vocab": 64, "batch": 1, "seq": 4, "rank": 2, "repeats": 1, "threads": 1}
    threads = torch.get_num_threads()
    try:
        times = bench.time_interleaved(job)
        results = [{**bench.measure_memory({**job, "variant": v}), "seconds": times[v]} for v in bench.VARIANTS]
    finally:
        torch.set_num_threads(threads)
    assert all(t > 0 for t in times.values())
    state = {r["variant"]: r["state_mb"] for r in results}
    assert state["efficient"] == state["adamw"] < state["full"]  # efficient keeps LoRA's state size
    lines = bench.report(results, bench.parse_args(["--widths", "32", "--rank", "2"]), "cmd")
    assert any(line.startswith("| 32 | LoRA-Pro full |") for line in lines)


def test_bench_lorapro_quick_path_and_default_widths(monkeypatch):
    """`--quick` runs `main` end to end (here in-process instead of one spawned process per row); the default run
    compares the three variants at two widths."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    bench = importlib.import_module("bench_lorapro")
    defaults = bench.parse_args([])
    assert len(defaults.widths) >= 2 and bench.VARIANTS == ("adamw", "full", "efficient")
    monkeypatch.setattr(bench, "in_fresh_process", lambda fn, *args, **kwargs: fn(*args))
    threads = torch.get_num_threads()
    try:
        lines = bench.main(["--quick", "--layers", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in lines if line.startswith("| 64 |")]
    assert [row.split(" | ")[1] for row in rows] == [bench.NAMES[v] for v in bench.VARIANTS]
    assert rows[0].split(" | ")[4] == "1.00"  # AdamW against itself: the ratio column
    assert "    python benchmarks/bench_lorapro.py --quick --layers 1" in lines
    assert bench.ratio(0.7, 0.0, bench.PEAK_RESOLUTION_MB) == "n/a" and bench.ratio(3.0, 2.0) == "1.50"
