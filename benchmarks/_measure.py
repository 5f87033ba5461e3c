"""Shared measuring helpers for the benchmarks: peak resident memory of a block, timing, fresh processes.

Memory on a CPU: the process's resident set (Linux `VmRSS` / `VmHWM`). `PeakRSS` trims the heap, reads the RSS,
resets the high-water mark (`/proc/self/clear_refs` with 5) and, on exit, reports `VmHWM - start` in MiB (if the
reset is refused it samples `VmRSS` every 2 ms instead). Each configuration runs in a fresh spawned process
(`in_fresh_process`) so that nothing freed by an earlier one is reused without showing up; memory runs start with
`LIVE_MEMORY_ENV` (a fixed glibc mmap threshold) so that the peak counts live tensors, not blocks the heap kept.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"{key} not found in /proc/self/status; expected a Linux kernel.")


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`), so the next baseline is the live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.peak_mb`: the peak RSS inside the block minus the RSS at its start."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.how = "VmHWM"
        self._env = "".join(f", {k}={os.environ[k]}" for k in LIVE_MEMORY_ENV if k in os.environ)

    def __enter__(self) -> "PeakRSS":
        trim_heap()
        self._start = _status_kb("VmRSS")
        self._sampled = self._start
        self._stop = threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.how = "VmRSS sampled every 2 ms"
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        peak = _status_kb("VmHWM") if self.how == "VmHWM" else max(self._sampled, _status_kb("VmRSS"))
        self.peak_mb = (peak - self._start) / 1024
        self.how += self._env


def median_seconds(step: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median wall time of `step()` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# glibc keeps freed heap blocks for reuse, so a process's RSS high-water mark also counts how its allocations
# happened to fragment. With a fixed mmap threshold every block above 64 KiB is its own mapping, returned to the OS
# when freed, so the peak follows the live tensors. Allocation gets slower (page faults): memory runs only.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def in_fresh_process(fn: Callable, *args, env: Optional[dict] = None):
    """`fn(*args)` in a new spawned Python process (fn must be importable at module level), with `env` added to
    its environment (read by the new interpreter at start-up, e.g. LIVE_MEMORY_ENV for memory measurements)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def machine_line() -> str:
    import torch

    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = len(os.sched_getaffinity(0))
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"load average {load} at the start")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
