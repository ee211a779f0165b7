"""An import inside a function needs a reason: a heavy third-party module kept off a fast path, or an ordering
constraint. The reason is a comment on the import's line, or just above it (above a group of imports, one comment
serves the group). Everything else is imported at the top of its file."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

PACKAGE = Path(__file__).resolve().parents[2] / "gptdist"


def has_reason(lines: List[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line above it, past the other imports and blank lines of its group."""
    if "#" in lines[lineno - 1]:
        return True
    for line in reversed(lines[: lineno - 1]):
        text = line.strip()
        if text.startswith("#"):
            return True
        if text and not text.startswith(("import ", "from ")):
            return False
    return False


def unexplained_imports() -> List[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for func in ast.walk(ast.parse(source)):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not has_reason(lines, node.lineno):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return sorted(set(found))  # a nested function is walked once per enclosing function


def test_every_import_inside_a_function_says_why():
    found = unexplained_imports()
    assert not found, "imports inside functions without a comment saying why:\n" + "\n".join(found)


def test_the_check_reads_comments_above_a_group():
    lines = ["def f():", "    # torch: heavy", "    import torch", "", "    from x import y", "    z = 1",
             "    import os"]
    assert has_reason(lines, 3) and has_reason(lines, 5)
    assert not has_reason(lines, 7)
