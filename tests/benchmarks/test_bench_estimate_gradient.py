"""`benchmarks/bench_estimate_gradient.py`'s code path in-process on a tiny model (the real run spawns a process per
row): the three variants run on the same batches, are timed side by side and reported as ratios to forward+backward."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
JOB = {"width": 32, "layers": 2, "vocab": 64, "batch": 1, "seq": 4, "iters": 2, "repeats": 1, "threads": 1}


@pytest.fixture
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    yield importlib.import_module("bench_estimate_gradient")
    torch.set_num_threads(threads)


def test_variants_compute_the_same_gradients_on_the_same_batches(bench):
    model, batches = bench.build(JOB)
    assert len(batches) == JOB["iters"] and batches[0]["input_ids"].shape == (JOB["batch"], JOB["seq"])
    plain = bench.runner(model, batches, "estimate")()
    offload = bench.runner(model, batches, "estimate_offload")()
    assert sorted(plain) == sorted(offload)
    for name in plain:
        torch.testing.assert_close(offload[name], plain[name], rtol=1e-5, atol=1e-7)
    assert bench.runner(model, batches, "fwd_bwd")() is None and all(p.grad is None for p in model.parameters())


def test_quick_measures_and_reports_ratios(bench):
    times = bench.time_interleaved(JOB)
    memory = {v: bench.measure_memory({**JOB, "variant": v}) for v in bench.VARIANTS}
    assert set(times) == set(bench.VARIANTS) and all(0 < t < 60 for t in times.values())
    assert all(m["peak_mb"] >= 0 for m in memory.values())
    lines = bench.report({"job": JOB, "times": times, "memory": memory}, "cmd --quick")
    assert lines[0].startswith("## ") and "    cmd --quick" in lines
    rows = [line for line in lines if line.startswith("| ") and "seconds" not in line and "---" not in line]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [bench.NAMES[v] for v in bench.VARIANTS]
    assert rows[0].split(" | ")[2] == "1.00"  # forward+backward is the reference of the time ratios
    quick = bench.parse_args(["--quick"])
    assert (quick.width, quick.layers, quick.iters, quick.repeats) == (64, 2, 2, 1)
