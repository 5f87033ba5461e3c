"""The README's quickstarts run as written (each Python block in a fresh namespace, in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_three_quickstarts():
    headings = re.findall(r"^## Quickstart: (.+)$", README.read_text(), re.M)
    assert headings == ["LoRA", "LoRA-GA", "LoRA-Pro"] and len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    assert any(tmp_path.iterdir()), "each quickstart saves an adapter folder"
