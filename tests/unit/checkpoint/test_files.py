"""A checkpoint's file set, without training: truncated, missing and corrupted files are found; files, folders and
links gptdist did not write make a checkpoint refused in one line; pruning keeps the newest, never fewer than one."""

import json

import pytest
import torch

from gptdist.checkpoint.layout_free import build_index, tensor_key
from gptdist.checkpoint.manifest import MANIFEST, checksum_problems, describe, list_files, write_manifest
from gptdist.checkpoint.safetensors_io import write_safetensors
from gptdist.checkpoint.saving import BackgroundRemoval
from gptdist.checkpoint.store import prune, resume_candidates
from gptdist.errors import UserError

STATE = "gptdist_state.json"


def _checkpoint(root, step, files=None):
    """A small checkpoint as gptdist writes it (one 25-element fp32 parameter, its index, state and RNG), plus any
    `files` given."""
    folder = root / f"step_{step:08d}"
    (folder / "model").mkdir(parents=True)
    (folder / "rng").mkdir()
    write_safetensors(folder / "model/rank00000.safetensors", {tensor_key("weight", "w", 0): torch.arange(25.0)})
    index = build_index(1, [("model/rank00000.safetensors", {"w": {"shape": [25], "partition_dim": None,
                                                                   "stride": 1, "stage": 0}}, [("w", 0, 25)])], [0])
    (folder / "model/index.json").write_text(json.dumps(index))
    write_safetensors(folder / "rng/rank00000.safetensors", {"torch": torch.zeros(4, dtype=torch.uint8)})
    (folder / STATE).write_text(json.dumps({"step": step, "config": {}}))
    for name, data in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    write_manifest(folder, describe(folder, list_files(folder)), step)
    return folder


def test_truncated_missing_and_corrupted(tmp_path):
    root = tmp_path / "checkpoints"
    ok = _checkpoint(root, 10)
    truncated = _checkpoint(root, 20)
    size = (truncated / "model/rank00000.safetensors").stat().st_size
    (truncated / "model/rank00000.safetensors").write_bytes(b"x" * 60)
    missing = _checkpoint(root, 30)
    (missing / "model/rank00000.safetensors").unlink()
    torn = root / "step_00000040"
    (torn / "model").mkdir(parents=True)
    (torn / "model/rank00000.safetensors").write_bytes(b"partial")
    flipped = _checkpoint(root, 50)
    (flipped / STATE).write_bytes((flipped / STATE).read_bytes().replace(b"50", b"51"))
    reports = []
    assert resume_candidates(root, reports.append) == [ok]
    text = "\n".join(reports)
    assert "step_00000050 is damaged (" in text and "SHA-256" in text  # the state is verified before it is parsed
    assert "step_00000040 is incomplete (no manifest" in text
    assert "step_00000030 is damaged (model/rank00000.safetensors is missing)" in text
    assert f"step_00000020 is damaged (model/rank00000.safetensors has 60 bytes, the manifest says {size}" in text
    # Same size, different bytes: only the checksum finds it.
    data = bytearray((ok / "model/rank00000.safetensors").read_bytes())
    data[-1] ^= 1
    (ok / "model/rank00000.safetensors").write_bytes(bytes(data))
    manifest = json.loads((ok / MANIFEST).read_text())
    assert checksum_problems(ok, manifest, ["model/rank00000.safetensors"]) == [
        "model/rank00000.safetensors does not match its SHA-256 (corrupted)"]


@pytest.mark.parametrize("plant,named", [
    (lambda f: (f / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04pickle"), "mp_rank_00_model_states.pt"),
    (lambda f: (f / "model/rank00001.safetensors").write_bytes(b"y"), "model/rank00001.safetensors"),
    (lambda f: (f / "zero").mkdir(), "folder zero"),
    (lambda f: (f / "rng.pt").symlink_to(f / STATE), "rng.pt is a symbolic link"),
])
def test_what_the_manifest_does_not_list_is_refused(tmp_path, plant, named):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 10)
    folder = _checkpoint(root, 20)
    plant(folder)
    with pytest.raises(UserError) as err:
        resume_candidates(root, lambda m: None)
    assert named in str(err.value) and "refused" in str(err.value) and "\n" not in str(err.value)


def test_a_listed_file_of_a_name_gptdist_never_writes_is_refused(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoints", 10, {"layer_01-model_states.pt": b"\x80\x04pickle"})
    with pytest.raises(UserError, match="layer_01-model_states.pt is not a file gptdist writes"):
        resume_candidates(folder.parent, lambda m: None)


def test_prune_keeps_the_new_checkpoint_and_the_newest_before_it(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        _checkpoint(root, step)
    (root / "step_00000005").mkdir()  # an old interrupted save
    (root / "step_00000008.partial").mkdir()  # an old save that never reached its rename
    (root / "step_00000050.partial").mkdir()  # a newer save killed before its rename (no save is in flight now)
    prune(root, keep=2, saved=40)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000030", "step_00000040"]
    prune(root, keep=1, saved=40)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000040"]


def test_prune_never_costs_the_new_checkpoint_for_a_newer_damaged_one(tmp_path):
    """The newest checkpoint (200) failed verification, so the run resumed from 100 and has just saved 110: with
    keep=1 the new checkpoint stays, the older one goes, and the damaged newer one is neither counted nor removed."""
    root = tmp_path / "checkpoints"
    for step in (100, 110, 200):
        _checkpoint(root, step)
    prune(root, keep=1, saved=110)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000110", "step_00000200"]
    prune(root, keep=3, saved=110)
    assert (root / "step_00000110").is_dir()


def test_prune_sets_old_checkpoints_aside_at_once_and_hands_them_over_for_deletion(tmp_path):
    """Pruning renames what it drops (nothing reads step_N.pruned) and leaves the deletion to `remove`, which the
    Checkpointer runs in a thread; a deletion a kill cut short (a .pruned folder) is handed over again next time."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _checkpoint(root, step)
    (root / "step_00000005.pruned").mkdir()
    handed = []
    prune(root, keep=1, saved=30, remove=handed.extend)
    assert [p.name for p in handed] == ["step_00000005.pruned", "step_00000010.pruned", "step_00000020.pruned"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005.pruned", "step_00000010.pruned",
                                                      "step_00000020.pruned", "step_00000030"]
    assert resume_candidates(root, lambda m: None)[0].name == "step_00000030"


def test_background_removal_deletes_in_a_thread_and_says_what_it_is_deleting(tmp_path):
    folders = [tmp_path / f"step_{s:08d}.pruned" for s in (1, 2)]
    for folder in folders:
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "rank00000.safetensors").write_bytes(b"x" * 1000)
    removal = BackgroundRemoval()
    assert removal.wait() is False  # nothing under way
    removal(folders)
    assert removal.deleting(folders[0]) and not removal.deleting(tmp_path / "step_00000003.partial")
    assert removal.wait() is True and not any(f.exists() for f in folders)
    assert not removal.deleting(folders[0]) and removal.wait() is False
