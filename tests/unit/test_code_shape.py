"""The training package stays readable: the loop fits on one screen and no function of train/ outgrows 60 lines;
no test file outgrows ~300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def function_lengths(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_the_loop_is_at_most_40_lines():
    lengths = dict(function_lengths(ROOT / "gptdist" / "train"))
    loop = [length for where, length in lengths.items() if where.endswith(" run_steps") and "loop.py" in where]
    assert loop and loop[0] <= 40, loop


def test_no_function_of_the_training_package_is_over_60_lines():
    assert [(where, n) for where, n in function_lengths(ROOT / "gptdist" / "train") if n > 60] == []


def test_no_test_file_is_over_300_lines():
    long = [(str(p.relative_to(ROOT)), n) for p in sorted((ROOT / "tests").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 310]
    assert long == []
