"""Crash-safe file writes (write to a temporary name in the same folder, then rename over the target), the clean-up
of temporaries a killed writer left, and an advisory lock on a folder for writers and readers of a file pair."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

try:  # POSIX; elsewhere the lock is a no-op (a reader still detects a mixed pair, see save_and_load)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _tmp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path`; on failure the old file (if any) is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def remove_stale_temporaries(folder: str, names: Iterable[str]) -> list[str]:
    """Delete the temporaries `atomic_write` made for `folder/<name>` and a killed process left behind; returns
    their names. Call it only while holding `folder_lock(folder)`, so that no live writer's temporary is among them."""
    prefixes = tuple(_tmp_prefix(name) for name in names)
    removed = []
    for entry in os.listdir(folder):
        if entry.startswith(prefixes) and entry.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, entry))
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


@contextmanager
def folder_lock(folder: str, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on `folder` itself (`flock` on the directory: no lock file is left in it): exclusive
    for a writer, `shared=True` for readers. Released when the block ends or the process dies (kill -9 included).
    Where folders cannot be locked (Windows, some network file systems) the block runs unlocked."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the lock
