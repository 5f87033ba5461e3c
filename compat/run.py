"""`make compat`: run upstream PEFT 0.21.2's own tests (LoRA + generic, see compat/select.py) against this package.

usage: python -m compat.run [--file test_custom_models.py ...] [--grep S ...] [--vgrep S ...] [-n N]
                            [--out DIR] [--report-only] [-- extra pytest args]

Fetches upstream's sdist into .cache/compat (compat/fetch.py), runs pytest there with this checkout first on
PYTHONPATH and two plugins: compat.shim (names this package lacks become `MissingInFork` placeholders) and
compat.plugin (deselection + outcome recording). Writes DIR/report.json and DIR/report.md and prints the summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from compat.fetch import CACHE, upstream_root
from compat.report import build, to_markdown
from compat.select import KEPT, default_selector

REPO = Path(__file__).resolve().parent.parent


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m compat.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", action="append", default=[], help="upstream test file (default: all of tests/)")
    parser.add_argument("--grep", action="append", default=[], help="keep only test ids containing this")
    parser.add_argument("--vgrep", action="append", default=[], help="drop test ids containing this")
    parser.add_argument("-n", "--workers", default=None, help="pytest-xdist workers (default 2 when installed, 0 off)")
    parser.add_argument("--out", type=Path, default=CACHE / "report", help="report folder")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from DIR/results.json")
    return parser.parse_args(argv), extra


def _targets(files: list[str]) -> list[str]:
    if not files:
        return ["tests"]
    return [f if f.startswith("tests/") else f"tests/{f}" for f in files]


def _deselected_files(root: Path) -> dict[str, str]:
    """File-level verdicts of the rule, for files whose collection may fail (their error is then not a failure)."""
    selector = default_selector(str(root / "src"))
    verdicts = {}
    for path in sorted((root / "tests").glob("test_*.py")):
        verdict = selector.classify(f"tests/{path.name}::<module>")
        if verdict != KEPT:
            verdicts[f"tests/{path.name}"] = verdict
    return verdicts


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    root = upstream_root()
    out = args.out.resolve()
    code = 0
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("results.json", "selection.json"):
            (out / stale).unlink(missing_ok=True)
        workers = args.workers
        if workers is None:
            workers = "2" if importlib.util.find_spec("xdist") else "0"
        cmd = [sys.executable, "-m", "pytest", "-p", "compat.shim", "-p", "compat.plugin", "-p", "no:cacheprovider",
               "-o", "addopts=", "-q", "-rN", "--tb=line", "--continue-on-collection-errors",
               "--compat-out", str(out), "--compat-upstream", str(root), "--rootdir", str(root)]
        cmd += [] if workers in ("0", 0) else ["-n", str(workers)]
        cmd += [f"--compat-grep={g}" for g in args.grep] + [f"--compat-vgrep={v}" for v in args.vgrep]
        cmd += [*extra, *_targets(args.file)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        code = subprocess.run(cmd, cwd=root, env=env).returncode
        if not (out / "results.json").exists():
            print(f"pytest wrote no results (exit {code})", file=sys.stderr)
            return code or 1
    summary = build(out, _deselected_files(root))
    print(to_markdown(summary))
    print(f"compat report: {out / 'report.md'} and {out / 'report.json'}")
    return 0 if code in (0, 1) else code  # 1 = some upstream tests failed: expected, reported above


if __name__ == "__main__":
    raise SystemExit(main())
