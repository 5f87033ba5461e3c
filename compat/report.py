"""Turn the plugin's raw outcomes (`results.json`, `selection.json`) into the compat report (JSON + markdown).

Outcomes per test: passed, failed, error (setup/teardown/collection), skipped, xfailed/xpassed. Two more classes are
taken out of the denominator and counted apart: `network` (failed only because the hub is offline: upstream's tests
load tiny models by hub id) and `gpu` (skipped for lack of an accelerator). Failures and errors are grouped by
reason: exception type + first line of the message with numbers, addresses, paths and quoted values normalised.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

NETWORK = re.compile(
    r"OfflineModeIsEnabled|LocalEntryNotFoundError|offline mode|HF_HUB_OFFLINE|Couldn't reach|couldn't connect|"
    r"not a valid model identifier|outgoing traffic has been disabled|cannot find the requested files|"
    r"Connection ?Error|connection error|cached snapshot|Cannot find an appropriate cached|internet connection",
    re.I)
GPU = re.compile(r"\bgpu\b|cuda|accelerator|xpu|multiple devices|requires? .*device|bitsandbytes|bnb", re.I)
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "network", "gpu")

_NORMALISE = [
    (re.compile(r"0x[0-9a-fA-F]+"), "<addr>"),
    (re.compile(r"(/[\w.\-]+)+/?"), "<path>"),
    (re.compile(r"\[[^\]]{40,}(\]|$)"), "[…]"),
    (re.compile(r"'[^']{40,}'|\"[^\"]{40,}\""), "'…'"),
    (re.compile(r"(?<![A-Za-z_])[-+]?\d+(\.\d+)?(e[-+]?\d+)?"), "N"),
    (re.compile(r"\s+"), " "),
]


def reason_of(message: str) -> str:
    """`compat.shim.MissingInFork: peft.x is not in this package` -> `MissingInFork: peft.x is not in this package`;
    first line only; numbers -> N; addresses, paths, long lists and quoted values blanked; cut at 160 characters."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "<no message>"
    head, sep, rest = first.partition(": ")
    if sep and re.fullmatch(r"[\w.]+", head):
        first = f"{head.rsplit('.', 1)[-1]}: {rest}"
    for pattern, repl in _NORMALISE:
        first = pattern.sub(repl, first)
    return first.strip()[:160]


def category(entry: dict) -> str:
    """Outcome class of one result entry (see `OUTCOMES`)."""
    outcome, message = entry["outcome"], entry.get("message", "")
    if outcome in ("failed", "error") and NETWORK.search(message):
        return "network"
    if outcome == "skipped" and GPU.search(message):
        return "gpu"
    return outcome


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _normalise_id(nodeid: str) -> str:
    """`.cache/compat/peft-0.21.2/tests/test_x.py::t` -> `tests/test_x.py::t` (xdist workers: other rootdir)."""
    at = nodeid.find("tests/")
    return nodeid[at:] if at > 0 else nodeid


def summarize(results: dict[str, dict], selection: list[dict], deselected_files: dict[str, str] | None = None,
              top: int | None = None) -> dict:
    """Counts per file and in total, deselected counts by reason, failure groups (largest first, with one example).

    `deselected_files` maps a file whose collection failed to its file-level verdict when the rule drops it anyway
    (its error then counts as deselected, not as a failure)."""
    deselected_files = deselected_files or {}
    per_file: dict[str, Counter] = defaultdict(Counter)
    deselected: Counter = Counter()
    groups: dict[str, dict] = {}
    for row in selection:
        if row["verdict"] != "kept":
            deselected[row["verdict"]] += row["count"]
    for raw_id, entry in results.items():
        nodeid = _normalise_id(raw_id)
        if entry.get("when") == "collect" and nodeid in deselected_files:
            deselected[f"{deselected_files[nodeid]} (collection error)"] += 1
            continue
        cat = category(entry)
        per_file[_file(nodeid)][cat] += 1
        if cat in ("failed", "error"):
            reason = reason_of(entry.get("message", ""))
            group = groups.setdefault(reason, {"reason": reason, "count": 0, "example": nodeid, "files": Counter()})
            group["count"] += 1
            group["files"][_file(nodeid)] += 1
    total = Counter()
    for counts in per_file.values():
        total.update(counts)
    ranked = sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))
    for group in ranked:
        group["files"] = dict(group["files"].most_common())
    denominator = total["passed"] + total["failed"] + total["error"]
    return {
        "total": {k: total[k] for k in OUTCOMES},
        "pass_rate": round(total["passed"] / denominator, 4) if denominator else None,
        "denominator": denominator,
        "per_file": {f: {k: c[k] for k in OUTCOMES} for f, c in sorted(per_file.items())},
        "deselected": dict(deselected.most_common()),
        "deselected_by_family": dict(_families(deselected).most_common()),
        "failure_groups": ranked[:top],  # top=None: every group
        "failure_group_count": len(ranked),
    }


def _families(deselected: Counter) -> Counter:
    families: Counter = Counter()
    for verdict, n in deselected.items():
        families[verdict.split(":", 1)[0].split(" ", 1)[0]] += n
    return families


def to_markdown(summary: dict) -> str:
    t = summary["total"]
    lines = [
        "## Totals", "",
        f"passed {t['passed']} / failed {t['failed']} / errors {t['error']} / skipped {t['skipped']} "
        f"(xfailed {t['xfailed']}, xpassed {t['xpassed']}); pass rate {summary['pass_rate']} of "
        f"{summary['denominator']} (passed + failed + errors).",
        f"Out of the denominator: network {t['network']} (failed offline: hub model ids), gpu {t['gpu']} "
        "(skipped: no accelerator).", "",
        "## Per file", "",
        "| file | passed | failed | errors | skipped | network | gpu |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f, c in summary["per_file"].items():
        lines.append(f"| {f} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} | {c['network']} "
                     f"| {c['gpu']} |")
    lines += ["", "## Deselected (by the rule in compat/select.py)", "", "| reason | tests |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary["deselected_by_family"].items()]
    lines += ["", "<details><summary>by detailed reason</summary>", "", "| reason | tests |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary["deselected"].items()]
    lines += ["", "</details>", "",
              f"## Failure groups (top {len(summary['failure_groups'])} of {summary['failure_group_count']})", "",
              "| # | tests | reason | example |", "|---:|---:|---|---|"]
    for i, g in enumerate(summary["failure_groups"], 1):
        reason = g["reason"].replace("|", "\\|")
        lines.append(f"| {i} | {g['count']} | `{reason}` | `{g['example']}` |")
    return "\n".join(lines) + "\n"


def build(out: Path, deselected_files: dict[str, str] | None = None, top: int | None = None) -> dict:
    """Read `out/results.json` and `out/selection.json`, write `out/report.json` and `out/report.md`."""
    results = json.loads((out / "results.json").read_text())
    selection_path = out / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.exists() else []
    summary = summarize(results, selection, deselected_files, top)
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(to_markdown(summary))
    return summary
