"""Manifest checks without training: truncated, missing and corrupted files are found; pruning keeps the newest."""

import json

from gptdist.checkpoint.manifest import MANIFEST, checksum_problems, describe, list_files, write_manifest
from gptdist.checkpoint.store import prune, resume_candidates


def _checkpoint(root, step, files):
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    write_manifest(folder, describe(folder, list_files(folder)), step)
    return folder


def test_truncated_missing_and_corrupted(tmp_path):
    root = tmp_path / "checkpoints"
    ok = _checkpoint(root, 10, {"a.pt": b"x" * 100, "model/b.safetensors": b"y" * 50})
    truncated = _checkpoint(root, 20, {"a.pt": b"x" * 100})
    (truncated / "a.pt").write_bytes(b"x" * 60)
    missing = _checkpoint(root, 30, {"a.pt": b"x" * 100})
    (missing / "a.pt").unlink()
    torn = root / "step_00000040"
    torn.mkdir()
    (torn / "a.pt").write_bytes(b"partial")
    reports = []
    assert resume_candidates(root, reports.append) == [ok]
    text = "\n".join(reports)
    assert "step_00000040 is incomplete (no manifest" in text
    assert "step_00000030 is damaged (a.pt is missing)" in text
    assert "step_00000020 is damaged (a.pt has 60 bytes, the manifest says 100 (truncated?))" in text
    # Same size, different bytes: only the checksum finds it.
    (ok / "a.pt").write_bytes(b"z" * 100)
    manifest = json.loads((ok / MANIFEST).read_text())
    assert checksum_problems(ok, manifest, ["a.pt"]) == ["a.pt does not match its SHA-256 (corrupted)"]
    assert checksum_problems(ok, manifest, ["model/b.safetensors"]) == []


def test_prune_keeps_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        _checkpoint(root, step, {"a.pt": b"x"})
    (root / "step_00000005").mkdir()  # an old interrupted save
    prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000030", "step_00000040"]
