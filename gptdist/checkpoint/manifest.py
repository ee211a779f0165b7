"""A checkpoint is complete only when its manifest is on disk, and the `latest` pointer moves only after that.

The manifest lists every file of the checkpoint with its size and SHA-256. Hashing is shared: with N ranks, each
hashes every N-th file, so a large checkpoint is verified in parallel. A checkpoint whose manifest is missing
(the save was interrupted) or whose files do not match it (truncated, corrupted) is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

MANIFEST = "manifest.json"
LATEST = "latest"


def list_files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(folder: Path, names: Sequence[str]) -> Dict[str, Dict]:
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in names}


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file, flush it to disk, then rename over the target: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_manifest(folder: Path, files: Dict[str, Dict], step: int) -> None:
    write_atomically(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def read_manifest(folder: Path) -> Optional[Dict]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def size_problems(folder: Path, manifest: Dict) -> List[str]:
    """Cheap check, any rank, no reading of the data: every file there with the recorded size."""
    problems = []
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {info['size']} (truncated?)")
    return problems


def checksum_problems(folder: Path, manifest: Dict, names: Sequence[str]) -> List[str]:
    return [f"{name} does not match its SHA-256 (corrupted)" for name in names
            if sha256(folder / name) != manifest["files"][name]["sha256"]]
