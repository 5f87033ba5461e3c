"""Fetch upstream PEFT's test suite at run time (never vendored): its sdist from PyPI, unpacked into a cache folder.

The sdist ships `tests/` without `tests/__init__.py`, which upstream's relative imports (`from .testing_common ...`)
need, so an empty one is created in the unpacked copy. No test file is touched.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

UPSTREAM_VERSION = "0.21.2"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "compat"


def upstream_root(cache: Path = CACHE, version: str = UPSTREAM_VERSION) -> Path:
    """Path of the unpacked sdist (`<cache>/peft-<version>`), downloading and unpacking it on first use."""
    root = cache / f"peft-{version}"
    if (root / "tests" / "__init__.py").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"peft-{version}.tar.gz"
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"peft=={version}", "-d", str(cache)]
        subprocess.run(cmd, check=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")
    if not (root / "tests").is_dir():
        raise FileNotFoundError(f"{sdist} has no peft-{version}/tests folder; expected upstream's sdist layout")
    (root / "tests" / "__init__.py").touch()
    return root


if __name__ == "__main__":
    print(upstream_root())
