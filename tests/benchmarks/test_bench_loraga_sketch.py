"""`benchmarks/bench_loraga_sketch.py`'s code path in-process on tiny models (the real run spawns a process per
row and loads the real all-MiniLM-L6-v2): accuracy ratios, the one-step loss, the cost rows and the report."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    yield importlib.import_module("bench_loraga_sketch")
    torch.set_num_threads(threads)


def _acc_job(bench):
    return {"model": "llama", "width": 32, "layers": 1, "vocab": 64, "batch": 1, "seq": 8, "iters": 2, "r": 2,
            "ks": (4, 32), "passes": (2,), "lr": 1e-3, "targets": bench.LLAMA_TARGETS, "threads": 1}


def test_captured_ratio_is_one_for_the_exact_svd(bench):
    from peft.utils.lora_ga_utils import LowRankGradient

    g = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    exact = LowRankGradient(U=u, S=s, Vh=vh, shape=tuple(g.shape))
    assert bench.captured_ratios({"w": g}, {"w": exact}, 4) == pytest.approx([1.0], abs=1e-5)
    worst = LowRankGradient(U=u[:, 4:].flip(1), S=s[4:].flip(0), Vh=vh[4:].flip(0), shape=tuple(g.shape))
    assert bench.captured_ratios({"w": g}, {"w": worst}, 4)[0] < 1.0


def test_accuracy_and_cost_rows_and_report(bench):
    res = bench.accuracy(_acc_job(bench))
    assert res["targets"] == 7 and res["loss_exact"] == res["loss_exact"]  # finite
    lines = bench.accuracy_report(res)
    assert lines[0].startswith("### Accuracy") and any(line.startswith("| exact |") for line in lines)
    if bench.sketch_available():
        full = res["sketch"][(32, 2)]  # k >= rank(G): the sketch is exact
        assert full["median"] == pytest.approx(1.0, abs=1e-4) and full["min"] == pytest.approx(1.0, abs=1e-4)
        assert full["loss1"] == pytest.approx(res["loss_exact"], abs=1e-4)
    job = {"label": "tiny", "width": 32, "layers": 1, "vocab": 64, "batch": 1, "seq": 8, "iters": 2, "repeats": 1,
           "quant": False, "r": 2, "k": 8, "threads": 1}
    result = bench.cost(job, fresh=False)
    assert set(result["times"]) == set(bench.COST_VARIANTS)
    table = bench.cost_report([result], fresh=False)
    rows = [line for line in table if line.startswith("| tiny |")]
    assert len(rows) == len(bench.COST_VARIANTS) and rows[0].split(" | ")[3] == "1.00"
    args = bench.parse_args(["--quick"])
    acc, costs = bench.jobs(args)
    assert all(j["model"] == "llama" for j in acc) and any(c["quant"] for c in costs)
