"""`make bench`: run every `benchmarks/bench_*.py` and write their reports into docs/benchmarks.md.

Contract for a benchmark script: `python benchmarks/bench_NAME.py [--quick]` prints its report as Markdown on
stdout (a `## ` heading, the command, the machine, a table of measurements and the ratios measured side by side in
that run); progress and logs go to stderr. The scripts run one after another, each in its own process.

    python benchmarks/run_all.py                  # all benchmarks, write docs/benchmarks.md
    python benchmarks/run_all.py --quick          # every code path in seconds; writes nothing unless --out
    python benchmarks/run_all.py --only lora_step,lorapro
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep rather than spin (the 2 cores are shared; spinning makes timings erratic); every
# benchmark subprocess inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ORDER = ["bench_lora_step.py", "bench_lorapro.py", "bench_estimate_gradient.py", "bench_loraga_distributed.py",
         "bench_lorapro_sharded.py", "bench_loraga_sketch.py", "bench_variants.py"]


def discover(only: list[str] | None) -> list[Path]:
    """The benchmark scripts present, the known ones first (in ORDER), then any others by name."""
    found = sorted(HERE.glob("bench_*.py"), key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER),
                                                          p.name))
    if only:
        wanted = {f"bench_{name}.py" for name in only}
        missing = wanted - {p.name for p in found}
        if missing:
            raise ValueError(f"Invalid --only {sorted(missing)}: expected names from "
                             f"{[p.stem[len('bench_'):] for p in found]}.")
        found = [p for p in found if p.name in wanted]
    return found


def run_script(path: Path, quick: bool) -> tuple[str, float, int]:
    """(stdout, seconds, return code) of one benchmark script; its stderr streams through."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(path), *(["--quick"] if quick else [])], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    return proc.stdout, time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--only", default=None, help="comma list of benchmark names (bench_NAME.py)")
    p.add_argument("--out", type=Path, default=None, help="report path (default docs/benchmarks.md unless --quick)")
    args = p.parse_args(argv)
    out = args.out or (None if args.quick else ROOT / "docs" / "benchmarks.md")
    scripts = discover(args.only.split(",") if args.only else None)
    command = " ".join(["python benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    sections, failed = [], []
    for path in scripts:
        print(f"== {path.name}", file=sys.stderr, flush=True)
        text, seconds, code = run_script(path, args.quick)
        print(text, flush=True)
        if code != 0:
            failed.append(path.name)
            text += f"\n**{path.name} failed with exit code {code}.**\n"
        sections += [text.strip(), "", f"_({path.name}: {seconds:.0f} s)_", ""]
    if out is not None:
        header = ["# Benchmarks", "", "Written by `make bench`; every table below is what that run printed.", "",
                  f"    {command}", ""]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(header + sections))
        print(f"wrote {out}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
