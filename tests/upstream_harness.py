"""Run code against the real upstream PEFT package (``peft==0.21.2`` from PyPI), isolated from this fork.

Upstream is never a dependency of this package; it is a reference to test against. This module does two things:

1. ``ensure_upstream_peft()`` makes sure upstream PEFT is installed, pure Python and without dependencies, into a
   cached folder with ``pip install --no-deps --target <dir> peft==0.21.2`` and returns that folder. The folder is,
   in order: ``$PEFT_UPSTREAM_DIR`` when set; else ``/tmp/upstream_peft`` when it already holds peft 0.21.2 (a local
   shortcut); else ``<repo>/.cache/upstream-peft`` (gitignored), installed on first use. The install goes to a
   temporary sibling folder that is renamed into place, so an interrupted install never leaves a half folder.
   It needs PyPI (or a pip index configured in the environment) the first time only.

2. ``run_upstream(source_or_path, args)`` runs a Python script in a subprocess of the same interpreter (so the same
   torch / transformers / safetensors) with the upstream folder FIRST on ``PYTHONPATH``, the script in a scratch
   folder as working directory, ``HF_HUB_OFFLINE=1``, and this repository made unimportable: the repo root is
   removed from ``sys.path`` and the editable-install finder of this fork is removed from ``sys.meta_path``. Before
   the script runs, a preamble imports ``peft`` and fails unless ``peft.__version__ == "0.21.2"`` and its file lies in
   the upstream folder. The script receives ``sys.argv = [script, *args]`` and a global ``emit(obj)`` that records a
   JSON-able result; ``run_upstream`` returns an ``UpstreamResult`` with ``stdout``, ``stderr`` and ``data`` (what
   ``emit`` got, else ``None``). A non-zero exit raises ``UpstreamError`` carrying the tail of stderr.

Typical use (pass tensors through files: ``torch.save`` / ``safetensors`` / JSON in a temporary folder)::

    from tests.upstream_harness import run_upstream
    result = run_upstream('''
    import sys, torch
    from peft import PeftModel
    ...
    emit({"max_abs": 0.0})
    ''', args=[str(tmp_path)])
    assert result.data["max_abs"] < 1e-5

Environment variables: ``PEFT_UPSTREAM_DIR`` (install/reuse folder), ``PEFT_UPSTREAM_OPTIONAL=1`` (tests may skip
instead of fail when the upstream package cannot be installed, e.g. on a machine without a package index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

UPSTREAM_VERSION = "0.21.2"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO_ROOT / ".cache" / "upstream-peft"
LOCAL_REUSE_DIR = Path("/tmp/upstream_peft")


class UpstreamUnavailable(RuntimeError):
    """Upstream PEFT could not be installed (no package index reachable, pip failure, ...)."""


class UpstreamError(RuntimeError):
    """The upstream-side script failed (non-zero exit)."""


@dataclass
class UpstreamResult:
    stdout: str
    stderr: str
    data: Any


def has_upstream(folder: Union[str, Path], version: str = UPSTREAM_VERSION) -> bool:
    """Whether `folder` holds an installed `peft` of exactly `version` (package plus its dist-info)."""
    folder = Path(folder)
    return (folder / "peft" / "__init__.py").is_file() and (folder / f"peft-{version}.dist-info").is_dir()


def _pip_install(target: Path, version: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-staging-", dir=target.parent))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--quiet", "--target", str(staging), f"peft=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not has_upstream(staging, version):
            raise UpstreamUnavailable(
                f"Could not install upstream peft=={version} with {' '.join(cmd)!r} "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        if not has_upstream(target, version):  # another process may have won the race
            if target.exists():
                shutil.rmtree(target)
            try:
                os.replace(staging, target)
            except OSError:
                if not has_upstream(target, version):
                    raise
    except subprocess.TimeoutExpired as exc:
        raise UpstreamUnavailable(f"Installing upstream peft=={version} timed out: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_upstream_peft(target: Optional[Union[str, Path]] = None, version: str = UPSTREAM_VERSION) -> Path:
    """The folder holding upstream `peft==version`, installing it there first when needed.

    `target` (else `$PEFT_UPSTREAM_DIR`, else `/tmp/upstream_peft` if it already has this version, else
    `<repo>/.cache/upstream-peft`). Raises `UpstreamUnavailable` when pip cannot install it.
    """
    if target is None and os.environ.get("PEFT_UPSTREAM_DIR"):
        target = os.environ["PEFT_UPSTREAM_DIR"]
    if target is None:
        target = LOCAL_REUSE_DIR if has_upstream(LOCAL_REUSE_DIR, version) else DEFAULT_DIR
    target = Path(target).resolve()
    if not has_upstream(target, version):
        _pip_install(target, version)
    return target


_PREAMBLE = '''
import json as _json, os as _os, runpy as _runpy, sys as _sys

_repo = _os.path.realpath({repo!r})
_upstream = _os.path.realpath({upstream!r})
_sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or ".") != _repo]
_sys.meta_path[:] = [f for f in _sys.meta_path
                     if not (getattr(f, "__module__", "") or "").startswith("__editable___peft")]
import peft as _peft
if _peft.__version__ != {version!r} or not _os.path.realpath(_peft.__file__).startswith(_upstream + _os.sep):
    raise SystemExit(f"upstream harness: imported peft {{_peft.__version__}} from {{_peft.__file__}}, "
                     f"expected {version} from {{_upstream}}")
try:
    import tests as _t
except ImportError:
    _t = None
if _t is not None and _os.path.realpath(getattr(_t, "__file__", None) or "").startswith(_repo + _os.sep):
    raise SystemExit(f"upstream harness: the repository is importable ({{_t.__file__}})")


def emit(obj):
    """Record the script's JSON-able result (read back by run_upstream as UpstreamResult.data)."""
    with open(_os.environ["PEFT_UPSTREAM_RESULT"], "w", encoding="utf-8") as _f:
        _json.dump(obj, _f)


_script = {script!r}
_sys.argv = [_script] + {args!r}
_runpy.run_path(_script, init_globals={{"emit": emit}}, run_name="__main__")
'''


def _subprocess_env(upstream: Path, result_path: Path, extra_env: Optional[dict]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update({
        "PYTHONPATH": str(upstream), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1", "PEFT_UPSTREAM_RESULT": str(result_path),
    })
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra_env or {})
    return env


def run_upstream(
    source_or_path: Union[str, Path], args: Sequence[str] = (), timeout: float = 300.0,
    extra_env: Optional[dict] = None, upstream_dir: Optional[Union[str, Path]] = None,
) -> UpstreamResult:
    """Run a script (a `Path` to a file, or Python source as `str`) with upstream PEFT as `peft`; see module doc."""
    upstream = ensure_upstream_peft(upstream_dir)
    with tempfile.TemporaryDirectory(prefix="upstream-run-") as scratch:
        scratch_path = Path(scratch)
        if isinstance(source_or_path, Path):
            script = source_or_path.resolve()
        else:
            script = scratch_path / "upstream_script.py"
            script.write_text(textwrap.dedent(source_or_path), encoding="utf-8")
        runner = scratch_path / "upstream_runner.py"
        runner.write_text(_PREAMBLE.format(repo=str(REPO_ROOT), upstream=str(upstream), version=UPSTREAM_VERSION,
                                           script=str(script), args=[str(a) for a in args]), encoding="utf-8")
        result_path = scratch_path / "result.json"
        try:
            proc = subprocess.run([sys.executable, str(runner)], cwd=scratch, capture_output=True, text=True,
                                  timeout=timeout, env=_subprocess_env(upstream, result_path, extra_env))
        except subprocess.TimeoutExpired as exc:
            raise UpstreamError(f"Upstream script timed out after {timeout} s: {exc}") from None
        if proc.returncode != 0:
            raise UpstreamError(f"Upstream script failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        data = json.loads(result_path.read_text(encoding="utf-8")) if result_path.exists() else None
    return UpstreamResult(stdout=proc.stdout, stderr=proc.stderr, data=data)
