"""One save: a snapshot taken in the step that saves, written by a background thread, committed by rank 0.

    snapshot (main thread, every rank)   copies of this rank's fragments (weights and moments it owns), its random
                                         states, and on rank 0 the run's state: the only part training waits for
    write (a thread, every rank)         model/rank<r>.safetensors and rng/rank<r>.safetensors in step_N.partial/,
                                         hashed as they are written, fsynced with their folders
    commit (collective, then rank 0)     once every rank's write is done: the index and state files, the manifest
                                         (the exact file set, sizes, SHA-256), the rename to step_N/, `latest`,
                                         then pruning

The writer does no collective and touches nothing training uses: the snapshot is its own memory. Host memory for
the snapshot (12 bytes per parameter this rank owns) is allocated once and reused by every save.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from gptdist.checkpoint import rng
from gptdist.checkpoint.fragments import collect, piece_shapes
from gptdist.checkpoint.layout_free import MOMENTS, build_index, tensor_key
from gptdist.checkpoint.manifest import (
    INDEX_FILE,
    LATEST,
    STATE_FILE,
    describe,
    foreign_entries,
    fsync_dir,
    write_atomically,
    write_durably,
    write_manifest,
)
from gptdist.checkpoint.safetensors_io import write_safetensors
from gptdist.checkpoint.store import prune, remove_now, tag_for


@dataclass
class Snapshot:
    step: int
    rank: int
    tensors: Dict[str, torch.Tensor]  # tensor key -> 1-D CPU copy
    fragments: List[Tuple[str, int, int]]  # (name, start, numel)
    pieces: Dict[str, Dict]  # name -> piece shape and split
    rng: Tuple[Dict[str, torch.Tensor], Dict[str, str]]
    state: Optional[Dict[str, Any]]  # rank 0 only
    blocking_s: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class SnapshotBuffers:
    """Host memory for snapshots, allocated at the first save and reused: a save costs a copy, not an allocation
    (pinned on GPU, so the device-to-host copy runs at full speed)."""

    def __init__(self) -> None:
        self._buffers: Dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def copy(self, key: str, value: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != value.numel():
            pin = value.device.type == "cuda"
            buf = torch.empty(value.numel(), dtype=torch.float32, pin_memory=pin)
            self._buffers[key] = buf
        buf.copy_(value.detach().reshape(-1), non_blocking=value.device.type == "cuda")
        return buf


def take_snapshot(engine, param_names, topology, rank: int, step: int, state: Optional[Dict[str, Any]],
                  buffers: SnapshotBuffers) -> Snapshot:
    tensors: Dict[str, torch.Tensor] = {}
    fragments = []
    for frag in collect(engine, param_names, topology):
        tensors[tensor_key("weight", frag.name, frag.start)] = buffers.copy(f"w/{frag.name}@{frag.start}", frag.weight)
        for key in MOMENTS:
            if key in frag.moments:
                tensors[tensor_key(key, frag.name, frag.start)] = buffers.copy(f"{key}/{frag.name}@{frag.start}",
                                                                               frag.moments[key])
        fragments.append((frag.name, frag.start, frag.numel))
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the copies above are asynchronous on a GPU
    return Snapshot(step, rank, tensors, fragments, piece_shapes(engine, param_names, topology), rng.capture(), state)


@dataclass
class WriteResult:
    files: Dict[str, Dict] = field(default_factory=dict)  # relative path -> {size, sha256}
    fragments: List[Tuple[str, int, int]] = field(default_factory=list)
    pieces: Dict[str, Dict] = field(default_factory=dict)
    error: Optional[str] = None
    write_s: float = 0.0
    blocking_s: float = 0.0
    nbytes: int = 0
    tp_rank: int = 0


class BackgroundWrite:
    """This rank's files of one save, written by a thread (or at once, for a synchronous save)."""

    def __init__(self, snapshot: Snapshot, folder: Path, tp_rank: int, drills=None) -> None:
        self.snapshot, self.folder, self.drills = snapshot, folder, drills
        self.result = WriteResult(fragments=snapshot.fragments, pieces=snapshot.pieces,
                                  blocking_s=snapshot.blocking_s, tp_rank=tp_rank)
        self._thread = threading.Thread(target=self._run, name="gptdist-checkpoint-writer", daemon=True)

    def start(self) -> "BackgroundWrite":
        self._thread.start()
        return self

    def run_here(self) -> "BackgroundWrite":
        self._run()
        return self

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return self.done()

    def _run(self) -> None:
        start = time.perf_counter()
        snap = self.snapshot
        if threading.current_thread() is self._thread:
            _lowest_priority()
        try:
            for sub in ("model", "rng"):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
            model_file = f"model/rank{snap.rank:05d}.safetensors"
            size, digest = write_safetensors(self.folder / model_file, snap.tensors)
            self.result.files[model_file] = {"size": size, "sha256": digest}
            if self.drills is not None:
                self.drills.kill_if_due("kill-during-write", snap.step)
            rng_file = f"rng/rank{snap.rank:05d}.safetensors"
            size, digest = write_safetensors(self.folder / rng_file, *snap.rng)
            self.result.files[rng_file] = {"size": size, "sha256": digest}
            for sub in ("model", "rng"):
                fsync_dir(self.folder / sub)
            self.result.nbytes = sum(f["size"] for f in self.result.files.values())
        except OSError as exc:
            self.result.error = f"rank {snap.rank} could not write {self.folder}: {exc.strerror or exc}"
        self.result.write_s = time.perf_counter() - start


class BackgroundRemoval:
    """Deletes the folders that pruning set aside (old checkpoints renamed step_N.pruned, interrupted saves) in a
    thread, so that training does not wait for a large checkpoint's deletion: 0.13-0.16 s for 720 MB on a local disk
    here, seconds on a network file system. One deletion at a time. A save waits for it only where it must: when a
    folder of its own name is being deleted, or when the room for it may be what the deletion frees."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._folders: List[Path] = []

    def __call__(self, folders: List[Path]) -> None:
        self.wait()
        if folders:
            self._folders = list(folders)
            self._thread = threading.Thread(target=self._run, args=(self._folders,), name="gptdist-checkpoint-pruner",
                                            daemon=True)  # a kill leaves the .pruned folders to the next prune
            self._thread.start()

    @staticmethod
    def _run(folders: List[Path]) -> None:
        _lowest_priority()
        remove_now(folders)

    def deleting(self, folder: Path) -> bool:
        return self._thread is not None and folder in self._folders

    def wait(self) -> bool:
        """Waits for the deletion under way, if any: True when there was one."""
        thread, self._thread, self._folders = self._thread, None, []
        if thread is None:
            return False
        thread.join()
        return True


def _lowest_priority() -> None:
    """The writer thread yields the cores to training: on Linux a thread is a task with a niceness of its own, so
    hashing and writing use what the training threads leave (on a machine with spare cores, that is all of it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: the thread keeps the process's priority


def commit(root: Path, step: int, results: List[WriteResult], tp: int, state: Dict[str, Any],
           keep: int, remove: Callable[[List[Path]], None] = remove_now) -> Optional[str]:
    """Rank 0, once every rank's write is done: make the save of `step` a complete checkpoint. Returns why it could
    not (the partial folder is then removed and the previous checkpoints stay as they were), or None. `remove`
    deletes the folders pruning set aside (BackgroundRemoval: in a thread)."""
    partial = root / f"{tag_for(step)}.partial"
    failed = [r.error for r in results if r.error]
    if failed:
        shutil.rmtree(partial, ignore_errors=True)
        return failed[0]
    try:
        per_rank = [(next(f for f in r.files if f.startswith("model/")), r.pieces, r.fragments) for r in results]
        index = build_index(tp, per_rank, [r.tp_rank for r in results])
        write_durably(partial / INDEX_FILE, json.dumps(index).encode())
        write_durably(partial / STATE_FILE, json.dumps(state, indent=1).encode())
        fsync_dir(partial / "model")
        fsync_dir(partial)  # every file and folder is on disk before the manifest that names them
        files: Dict[str, Dict] = {}
        for r in results:
            files.update(r.files)
        files.update(describe(partial, [INDEX_FILE, STATE_FILE]))
        manifest = {"files": dict(sorted(files.items()))}
        foreign = foreign_entries(partial, manifest)
        if foreign:  # something besides the ranks' writes is in the folder: never seal it into a checkpoint
            raise RuntimeError(f"{partial}: {foreign[0]}")
        write_manifest(partial, manifest["files"], step)
        fsync_dir(partial)
        _rename_into_place(partial, root / tag_for(step))
        write_atomically(root / LATEST, tag_for(step) + "\n")
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        return f"the checkpoint of step {step} could not be sealed in {root}: {getattr(exc, 'strerror', None) or exc}"
    prune(root, keep, step, remove)
    return None


def _rename_into_place(partial: Path, final: Path) -> None:
    """step_N.partial -> step_N. A complete checkpoint of the same step (a run resumed from an older one reached
    it again) is moved aside first and removed only once the new one is in place."""
    aside = None
    if final.exists():
        aside = final.with_name(final.name + ".replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(partial, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
