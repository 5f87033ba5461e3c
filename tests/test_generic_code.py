"""Generic code knows no tuner type: no `lora_` in the code (names and string literals; comments and docstrings may
cite LoRA's names as examples) of the modules every tuner type goes through, and LoRA imports neither LoRA-GA nor
LoRA-Pro (LoRA-GA fills LoRA's extension points, `peft/tuners/lora/hooks.py`).

Generic: `peft/*.py`, `peft/utils/*.py` and `peft/tuners/*.py`, except the public-name indexes (`__init__.py`,
which import every tuner folder) and the modules that only re-export a method's code under upstream's or the
seed's import path (`peft/utils/lora_ga_utils.py`, `peft/utils/hotswap.py`). Method code lives in
`peft/tuners/<type>/` and `peft/optimizers/` (LoRA-Pro's optimizer)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PEFT = Path(__file__).resolve().parents[1] / "peft"
RE_EXPORTS = {"utils/lora_ga_utils.py", "utils/hotswap.py"}


def generic_modules() -> list[Path]:
    files = [*PEFT.glob("*.py"), *(PEFT / "utils").glob("*.py"), *(PEFT / "tuners").glob("*.py")]
    return sorted(f for f in files
                  if f.name != "__init__.py" and str(f.relative_to(PEFT)) not in RE_EXPORTS)


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


_TOKENS = {tokenize.NAME, tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def code_mentions(path: Path, needle: str, root: Path = PEFT) -> list[str]:
    """`path:line: token` for each name or non-docstring string literal of `path` containing `needle`."""
    source = path.read_text()
    skip = _docstring_lines(ast.parse(source))
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in _TOKENS and needle in tok.string and tok.start[0] not in skip:
            found.append(f"{path.relative_to(root)}:{tok.start[0]}: {tok.string[:60]}")
    return found


def test_the_scan_sees_code_and_skips_docstrings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Doc `lora_A`."""\n# comment lora_B\nKEY = "x.lora_A"\nlora_x = 1\n'
                      'def f():\n    """lora_ in a docstring"""\n    return f"{KEY}.lora_B"\n')
    hits = code_mentions(sample, "lora_", root=tmp_path)
    assert [h.split(":")[1] for h in hits] == ["3", "4", "7"]


def test_no_lora_names_in_generic_code():
    modules = generic_modules()
    assert len(modules) > 20  # the scan covers what it says
    hits = [hit for path in modules for hit in code_mentions(path, "lora_")]
    assert hits == []


def test_lora_imports_neither_loraga_nor_lorapro():
    offending = []
    for path in sorted((PEFT / "tuners" / "lora").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any("loraga" in n or "lorapro" in n for n in names):
                offending.append(f"{path.name}:{node.lineno}")
    assert offending == []
