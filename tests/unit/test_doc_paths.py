"""Every file a docstring, comment or doc names exists: a moved or renamed module leaves no stale path behind.

Read: gptdist/**/*.py, tests/**/*.py, README.md and docs/*.md. A mention `some/folder/name.py` must exist relative
to the repository root, gptdist/, tests/ or the mentioning file's folder; a bare `name.py` must be the name of some
Python file in the repository. Absolute paths, home paths and URLs point outside the repository and are not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List

ROOT = Path(__file__).resolve().parents[2]

# Mentions of files that are not gptdist's, each with the reason.
OUTSIDE = {
    "prepare.py": "nanoGPT's data/shakespeare_char/prepare.py, the split docs/data.md compares with",
    "gptdist/checkpoint/planted.py": "a made-up file the import-layer test plants in a copy of the import graph",
    "planted.py": "the same made-up file",
    "x.py": "a made-up file name in the import-layer test",
}

WITH_FOLDER = re.compile(r"(?<![\w./~-])((?:[\w.-]+/)+[\w.-]+\.py)\b")
BARE = re.compile(r"(?<![\w./~-])([\w-]+\.py)\b")


def read_files() -> List[Path]:
    """This file aside: its examples are made up on purpose."""
    files = [*ROOT.glob("gptdist/**/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md")]
    return [path for path in files if path != Path(__file__).resolve()]


def mentions(path: Path) -> Iterator[tuple]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for match in WITH_FOLDER.finditer(line):
            yield number, match.group(1), True
        for match in BARE.finditer(line):
            yield number, match.group(1), False


def missing_files() -> List[str]:
    python_names = {p.name for p in ROOT.rglob("*.py") if ".git" not in p.parts}
    found = []
    for path in read_files():
        bases = (ROOT, ROOT / "gptdist", ROOT / "tests", path.parent)
        for number, name, has_folder in mentions(path):
            if name in OUTSIDE:
                continue
            exists = any((base / name).is_file() for base in bases) if has_folder else name in python_names
            if not exists:
                found.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    return found


def test_every_named_file_exists():
    found = missing_files()
    assert not found, "files named in docstrings, comments or docs that do not exist:\n" + "\n".join(found)


def test_the_patterns_find_paths_and_skip_urls():
    line = "see train/memory.py, tp_head.py and https://example.com/a/b.py or ~/x/y.py"
    assert [m.group(1) for m in WITH_FOLDER.finditer(line)] == ["train/memory.py"]
    assert [m.group(1) for m in BARE.finditer(line)] == ["tp_head.py"]
