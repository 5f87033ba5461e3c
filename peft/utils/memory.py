"""How much host memory a new allocation can still get (checked before creating large adapters)."""

from __future__ import annotations

import os
from typing import Optional


def available_memory_bytes() -> Optional[int]:
    """Host memory a new allocation can still get: MemAvailable + SwapFree (Linux), else the physical total, else
    None (unknown: no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.rstrip().endswith("kB")}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
