"""Pytest plugin for `make compat` (`-p compat.plugin`): deselects by `compat.select`, records every outcome.

Options: `--compat-out DIR` (where `selection.json` and `results.json` go), `--compat-grep S` / `--compat-vgrep S`
(substring filters on the test id, repeatable: all greps must match, no vgrep may). Works under pytest-xdist: the
workers collect and deselect (worker gw0, or the only process, writes the selection counts), the controller gets every
report and writes the results.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from compat.fetch import CACHE, UPSTREAM_VERSION
from compat.select import KEPT, default_selector


def pytest_addoption(parser):
    group = parser.getgroup("compat")
    group.addoption("--compat-out", default=None, help="folder for selection.json / results.json")
    group.addoption("--compat-upstream", default=None, help="unpacked upstream sdist (default: compat.fetch's)")
    group.addoption("--compat-grep", action="append", default=[], help="keep only ids containing this")
    group.addoption("--compat-vgrep", action="append", default=[], help="drop ids containing this")


def _out(config) -> Path | None:
    out = config.getoption("compat_out")
    return Path(out) if out else None


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(session, config, items):
    upstream = config.getoption("compat_upstream") or str(CACHE / f"peft-{UPSTREAM_VERSION}")
    selector = default_selector(str(Path(upstream) / "src"))
    greps, vgreps = config.getoption("compat_grep"), config.getoption("compat_vgrep")
    kept, dropped, verdicts = [], [], Counter()
    for item in items:
        if greps and not all(g in item.nodeid for g in greps) or any(v in item.nodeid for v in vgreps):
            dropped.append(item)
            continue
        callspec = getattr(item, "callspec", None)
        verdict = selector.classify_item(item.nodeid, callspec.params if callspec is not None else None)
        verdicts[(item.nodeid.split("::", 1)[0], verdict)] += 1
        (kept if verdict == KEPT else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    out = _out(config)
    if out is not None and (not _is_worker(config) or config.workerinput.get("workerid") == "gw0"):
        rows = [{"file": f, "verdict": v, "count": n} for (f, v), n in sorted(verdicts.items())]
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.json").write_text(json.dumps(rows, indent=1))


def _message(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # skip: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    text = str(longrepr or "").strip().splitlines()
    return text[-1] if text else ""


class _Recorder:
    def __init__(self, out: Path):
        self.out = out
        self.results: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        nodeid, entry = report.nodeid, None
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                entry = {"outcome": "xfailed" if report.skipped else "xpassed"}
            elif report.passed:
                entry = {"outcome": "passed"}
            elif report.failed:
                entry = {"outcome": "failed", "message": _message(report)}
            else:
                entry = {"outcome": "skipped", "message": _message(report)}
        elif report.failed:  # setup / teardown error
            entry = {"outcome": "error", "message": _message(report), "when": report.when}
        elif report.skipped and report.when == "setup":
            entry = {"outcome": "skipped", "message": _message(report)}
        if entry is not None and self.results.get(nodeid, {}).get("outcome") not in ("failed", "error"):
            self.results[nodeid] = entry

    def pytest_collectreport(self, report):
        if report.failed:
            self.results[report.nodeid or "<collection>"] = {
                "outcome": "error", "message": _message(report), "when": "collect"}

    def pytest_sessionfinish(self, session):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))


def _keep_hub_offline() -> None:
    """Upstream's `hub_online_once` turns the hub back online for a model id's first access (and again after every
    failed one). Offline, each such access waits for connection timeouts and retries: minutes per test. Answering
    "offline" to every hub request makes it fail at once with the same `OfflineModeIsEnabled` it gets eventually;
    the report counts those as `network`."""
    import huggingface_hub.constants as hub_constants

    hub_constants.is_offline_mode = lambda: True


def pytest_configure(config):
    _keep_hub_offline()
    out = _out(config)
    if out is not None and not _is_worker(config):
        config.pluginmanager.register(_Recorder(out), "compat-recorder")
