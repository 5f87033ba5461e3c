"""The benchmarks' code paths on a tiny model, in-process (the real runs spawn a process per configuration)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lora_step_measure_variants():
    bench = _module("bench_lora_step")
    job = {"width": 32, "layers": 1, "vocab": 64, "batch": 2, "seq": 8, "repeats": 1, "threads": 1, "rank": 0}
    frozen = bench.measure({**job, "variant": "frozen"})
    full = bench.measure({**job, "variant": "full"})
    lora = bench.measure({**job, "variant": "lora", "rank": 2})
    assert frozen["trainable"] == 0 and full["trainable"] == full["total"]
    # rank 2 on 7 projections of one block: 2 * (in + out) per layer
    w, mlp = 32, int(2.6875 * 32)
    expected = 2 * (4 * (w + w) + 2 * (w + mlp) + (mlp + w))
    assert lora["trainable"] == expected
    assert all(r["seconds"] > 0 and r["peak_mb"] >= 0 for r in (frozen, full, lora))
    lines = bench.report([frozen, full, lora], bench.parse_args(["--widths", "32", "--ranks", "2"]), "cmd")
    row = next(line for line in lines if "LoRA r=2" in line)
    assert row.startswith("| 32 | LoRA r=2 |")


def test_run_all_discovers_known_benchmarks_first():
    run_all = _module("run_all")
    names = [p.name for p in run_all.discover(None)]
    assert names[0] == "bench_lora_step.py"
    known = [n for n in run_all.ORDER if n in names]
    assert names[:len(known)] == known
    with pytest.raises(ValueError, match="nope"):
        run_all.discover(["nope"])


def test_peak_rss_sees_an_allocation():
    measure = _module("_measure")
    with measure.PeakRSS() as mem:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del block
    assert mem.peak_mb > 48


def test_lora_step_interleaved_timing_covers_every_variant():
    bench = _module("bench_lora_step")
    job = {"width": 32, "layers": 1, "vocab": 64, "batch": 2, "seq": 8, "repeats": 2, "threads": 1}
    variants = [("frozen", 0), ("full", 0), ("lora", 2), ("lora", 4)]
    times = bench.time_interleaved(job, variants)
    assert set(times) == set(variants) and all(0 < t < 10 for t in times.values())


def test_cuda_bench_quick_runs_without_cuda():
    """The GPU benchmark's code paths on tiny sizes (it falls back to the CPU): the offload gradients equal the
    plain ones, and every optimizer variant reports a row."""
    bench = _module("cuda_bench")
    lines = bench.main(["--quick"])
    check = next(line for line in lines if line.startswith("Check:"))
    worst = float(check.split("at most ")[1].split()[0])
    assert worst < 1e-2
    for name in ("LoRA + torch AdamW", "LoRA-Pro full", "LoRA-Pro efficient", "full fine-tuning's optimizer"):
        assert any(name in line for line in lines), name


def _peak_of_a_freed_tensor(mib: int) -> tuple[float, str]:
    measure = _module("_measure")
    with measure.PeakRSS() as mem:
        x = torch.ones(mib * 2**20 // 4)  # touched pages, then freed before the block ends
        del x
    return mem.peak_mb, mem.how


def test_peak_rss_sees_a_freed_tensor_with_the_live_memory_setting():
    """Under LIVE_MEMORY_ENV a freed tensor's pages go back to the OS at once; the peak must still count them."""
    measure = _module("_measure")
    peak, how = measure.in_fresh_process(_peak_of_a_freed_tensor, 128, env=measure.LIVE_MEMORY_ENV)
    assert peak > 120, (peak, how)
    assert "MALLOC_MMAP_THRESHOLD_=65536" in how
