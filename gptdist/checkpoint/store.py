"""A run directory's checkpoints: their names, which are complete, which to resume from, and retention.

    RUN_DIR/checkpoints/
      step_00000100/
        model/index.json              where every tensor's fragments are (checkpoint/layout_free.py)
        model/rank00000.safetensors   rank 0's fp32 weights and Adam moments (checkpoint/fragments.py)
        rng/rank00000.safetensors     rank 0's random streams
        gptdist_state.json            step, data position, config, tokenizer identity, MLflow run, layout,
                                      the optimizer's counters
        manifest.json                 the file set: every file with its size and SHA-256, written last
      step_00000200.partial/          a save being written (or one a crash interrupted): never read
      step_00000050.pruned/           an old checkpoint being deleted after a newer one was sealed: never read
      latest                          the newest complete checkpoint's name, moved after its manifest

A save is written into `step_N.partial/` and renamed to `step_N/` once its manifest is durable, so a folder named
`step_N` either is complete or is left over from a crash in the instant of the rename (it then has no manifest and
is reported and skipped). Older checkpoints are pruned only after the new one is in place, never below one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from gptdist.checkpoint.manifest import (
    STATE_FILE,
    checksum_problems,
    foreign_entries,
    read_manifest,
    size_problems,
)
from gptdist.errors import UserError

_TAG = re.compile(r"^step_(\d{8,})$")
# Names nothing reads: a save being written or interrupted, a checkpoint moved aside by a save of the same step, one
# being deleted by pruning.
_PARTIAL = re.compile(r"^step_(\d{8,})\.(partial|replaced|pruned)$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def partial_folder(root: Path, step: int) -> Path:
    return root / f"{tag_for(step)}.partial"


def list_checkpoints(root: Path) -> List[tuple]:
    """(step, folder) of every step_* folder, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


def refuse_foreign(folder: Path, manifest: Dict) -> None:
    """One line for a checkpoint holding what gptdist did not write into it (planted, or put there by hand)."""
    foreign = foreign_entries(folder, manifest)
    if foreign:
        raise UserError(f"checkpoint {folder} is refused: {foreign[0]}; it must hold only what gptdist wrote "
                        "(remove that, or name another checkpoint)")


def read_state(folder: Path) -> Dict[str, Any]:
    """The checkpoint's state, once its checksum holds (it is small; read before any process group exists)."""
    manifest = read_manifest(folder)
    if manifest is None or STATE_FILE not in manifest["files"]:
        raise UserError(f"{folder}: no {STATE_FILE} in its manifest; this is not a checkpoint gptdist wrote")
    if checksum_problems(folder, manifest, [STATE_FILE]):
        raise UserError(f"{folder / STATE_FILE} does not match its SHA-256 (corrupted)")
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / STATE_FILE}: not readable JSON ({type(exc).__name__})") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("config"), dict)):
        raise UserError(f"{folder / STATE_FILE}: not a state gptdist wrote (no step or config)")
    return state


def damage(folder: Path) -> Optional[str]:
    """Why a checkpoint cannot be used, found cheaply (no data read but the small state file), or None. Raises
    UserError for files gptdist did not write."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "incomplete (no manifest.json: its save was interrupted)"
    refuse_foreign(folder, manifest)
    problems = size_problems(folder, manifest)
    if problems:
        return f"damaged ({problems[0]})"
    try:
        read_state(folder)
        _read_headers(folder, manifest)
    except UserError as err:
        return f"damaged ({str(err).replace(f'{folder}/', '')})"
    return None


def _read_headers(folder: Path, manifest: Dict) -> None:
    """The index and every tensor file's header, checked against the file sizes: a file that is not what its name
    says (a pickle under a safetensors name) is found here, before any process group, and nothing is unpickled."""
    # torch: only when a checkpoint is read, so `gptdist check` of a fresh run starts fast
    from gptdist.checkpoint.layout_free import LayoutFreeReader
    from gptdist.checkpoint.safetensors_io import SafetensorsFile

    try:
        LayoutFreeReader(folder / "model")
        for name in manifest["files"]:
            if name.startswith("rng/"):
                SafetensorsFile(folder / name)
    except UserError as err:  # the reasons name files by their full path: here, by their name in the checkpoint
        raise UserError(str(err).replace(f"{folder}/", "").split("; the checkpoint is damaged")[0]) from None


def resume_candidates(root: Path, report: Callable[[str], None]) -> List[Path]:
    """Complete-looking checkpoints, newest first. Interrupted or damaged ones are reported and left out; data
    checksums are verified later, by all ranks together (verify_checksums)."""
    out = []
    for _, folder in list_checkpoints(root):
        problem = damage(folder)
        if problem:
            report(f"checkpoint {folder} is {problem}; skipping it")
            continue
        out.append(folder)
    return out


def verify_checksums(folder: Path, rank: int, world_size: int) -> List[str]:
    """Collective: every rank checks every world_size-th file; returns all problems found, on every rank."""
    # torch: only when checksums are verified across ranks; this module stays light for `gptdist check`
    import torch.distributed as dist

    manifest = read_manifest(folder)
    names = sorted(manifest["files"])[rank::world_size]
    mine = checksum_problems(folder, manifest, names)
    if world_size == 1:
        return mine
    gathered: List[Optional[List[str]]] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return [p for part in gathered for p in part]


def storage_problem(root: Path, rank: int) -> Optional[str]:
    """Can this rank write a checkpoint as large as the newest complete one? Asked before writing anything, so
    a full disk or a read-only run directory costs this checkpoint, never the previous ones."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{rank}"
        probe.write_bytes(b"gptdist")
        probe.unlink()
    except OSError as exc:
        return f"{root} is not writable ({exc.strerror or exc})"
    newest = next((f for _, f in list_checkpoints(root) if read_manifest(f) is not None), None)
    if newest is None:
        return None
    needed = sum(info["size"] for info in read_manifest(newest)["files"].values())
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        return f"{free / 1e6:.1f} MB free in {root}, about {needed / 1e6:.1f} MB needed"
    return None


def remove_now(folders: List[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def prune(root: Path, keep: int, saved: int, remove: Callable[[List[Path]], None] = remove_now) -> None:
    """Rank 0, right after the save of step `saved` became a complete checkpoint (no other save is in flight): keep
    it and the newest `keep` - 1 complete checkpoints before it; drop older ones and every interrupted save.

    Checkpoints newer than `saved` are neither counted nor removed: they exist only when this run resumed from an
    older one because they failed verification (a damaged newest checkpoint must never cost the one just written, and
    it stays for whoever wants to look at it).

    A checkpoint to drop is first renamed to step_N.pruned (one rename: from then on nothing reads it), then `remove`
    deletes the folders, which may take a while for a large checkpoint on a network file system: the Checkpointer
    hands them to a thread. A deletion cut short by a kill is finished by the next prune."""
    found = list_checkpoints(root)
    older = [step for step, folder in found if step < saved and read_manifest(folder) is not None]
    kept = {saved, *older[:max(1, keep) - 1]}
    for step, folder in found:
        if step < saved and step not in kept:
            try:
                os.rename(folder, folder.with_name(folder.name + ".pruned"))
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
    doomed = []
    for leftover in root.iterdir():
        m = _PARTIAL.match(leftover.name)
        # Any .partial is a save that never completed (this one was renamed); a .replaced newer than `saved` is
        # left alone, since a kill between the two renames of _rename_into_place may have left it the only copy.
        if m and (m.group(2) != "replaced" or int(m.group(1)) <= saved):
            doomed.append(leftover)
    remove(sorted(doomed))
