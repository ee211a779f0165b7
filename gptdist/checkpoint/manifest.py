"""A checkpoint is complete only when its manifest is on disk, and the manifest is the checkpoint's file set.

The manifest lists every file of the checkpoint with its size and SHA-256, and nothing else may be there: a file or
folder it does not list, a symbolic link, or a file of a name gptdist never writes makes the checkpoint refused, so
no reader can be handed something the writer did not write. Sizes are checked cheaply before any process group
exists; checksums by the processes that read the files (all ranks of a job share the work).

Durability: every file and its folder are fsynced before the manifest is written; the manifest is written to a
temporary name, fsynced and renamed into place; `latest` moves after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

MANIFEST = "manifest.json"
LATEST = "latest"
STATE_FILE = "gptdist_state.json"
INDEX_FILE = "model/index.json"
# Every name a complete checkpoint may hold; anything else is refused.
_WRITTEN = re.compile(r"^(gptdist_state\.json|model/index\.json|model/rank\d{5}\.safetensors|"
                      r"rng/rank\d{5}\.safetensors)$")


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """A file written and fsynced (its folder is synced by the caller, once for all its files)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file, flush it to disk, then rename over the target: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_durably(tmp, text.encode("utf-8"))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(folder: Path, files: Dict[str, Dict], step: int) -> None:
    write_atomically(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def read_manifest(folder: Path) -> Optional[Dict]:
    """The manifest, or None where there is none or it does not parse (an interrupted or damaged save)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("size"), int)
                                              and isinstance(v.get("sha256"), str) for v in files.values()):
        return None
    return manifest


def foreign_entries(folder: Path, manifest: Dict) -> List[str]:
    """What the folder holds that its manifest does not account for: unlisted files and folders, symbolic links,
    listed names gptdist never writes. Any one of them makes the checkpoint refused."""
    listed = set(manifest["files"])
    folders = {str(Path(name).parent) for name in listed} - {"."}
    problems = [f"{name} is not a file gptdist writes into a checkpoint" for name in sorted(listed)
                if not _WRITTEN.match(name)]
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root).relative_to(folder)
        for name in sorted(dirs):
            rel = str(base / name)
            if (Path(root) / name).is_symlink():
                problems.append(f"{rel} is a symbolic link")
            elif rel not in folders:
                problems.append(f"folder {rel} is not listed in its manifest")
        for name in sorted(files):
            rel = str(base / name)
            if rel == MANIFEST:
                continue
            if (Path(root) / name).is_symlink():
                problems.append(f"{rel} is a symbolic link")
            elif rel not in listed:
                problems.append(f"{rel} is not listed in its manifest")
    return problems


def size_problems(folder: Path, manifest: Dict) -> List[str]:
    """Cheap check, any rank, no reading of the data: every listed file there with the recorded size."""
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
