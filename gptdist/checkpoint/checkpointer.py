"""The Checkpointer: everything a training run does with checkpoints, behind a few calls.

    open()                  the newest complete checkpoint whose checksums hold (all ranks verify together), falling
                            back past damaged ones; its state (step, data position, MLflow run, counters)
    weights                 what the model is built from when resuming (the checkpoint's layout-free weights)
    restore(engine, ...)    the optimizer's fp32 state, the counters and, in the same layout, each rank's random
                            streams; the same code for any layout (checkpoint/fragments.py)
    after_step(step, last)  saves when checkpoint.every / checkpoint.at_end ask, and completes a background save
                            once every rank has written its part
    save(step)              a save now (a stop signal)
    close() / abandon()     the end of the run: the save in flight completed, or said to be lost

A save blocks training only for a snapshot (checkpoint.async, the default): a copy of what this rank owns; a thread
writes it, and the checkpoint counts once rank 0 has sealed it with its manifest. One save is in flight at a time.
The state saved with the tensors is collected from the objects that own it (`keep_state_of`): the data feed's
position and tokenizer, the rank's layout, the telemetry's MLflow run; the checkpointer adds what it owns itself.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from gptdist.checkpoint import engine_state, fragments, rng
from gptdist.checkpoint.layout_free import LayoutFreeReader
from gptdist.checkpoint.locate import first_verified
from gptdist.checkpoint.resume import same_layout
from gptdist.checkpoint.safetensors_io import SafetensorsFile
from gptdist.checkpoint.saving import (
    BackgroundRemoval,
    BackgroundWrite,
    SnapshotBuffers,
    WriteResult,
    commit,
    take_snapshot,
)
from gptdist.checkpoint.store import checkpoint_root, partial_folder, read_state, storage_problem, verify_checksums
from gptdist.config import config_changes

FORMAT = 2


@dataclass
class SaveRecord:
    """What one completed (or failed) save cost, for metrics.jsonl and MLflow."""

    step: int
    ok: bool
    blocking_s: float  # what training waited for: the longest rank's snapshot, plus the seal below
    write_s: float  # the longest any rank's background write took
    nbytes: int  # every rank's files together
    problem: Optional[str] = None
    seal_s: float = 0.0  # on the training thread: waiting for the write (if unfinished), agreeing, rank 0 sealing


class Checkpointer:
    def __init__(self, cfg, rank, candidates: List[Path], log, drills) -> None:
        """rank: engine.process.Rank; candidates: the checkpoints preflight found, newest first; log: rank-0
        messages (telemetry.log.RankZeroLog); drills: train.drills.FaultDrills."""
        self.cfg, self.rank, self.candidates, self.log, self.drills = cfg, rank, candidates, log, drills
        self.root = checkpoint_root(Path(cfg.run.dir))
        self.folder: Optional[Path] = None  # the checkpoint resumed from
        self.state: Dict[str, Any] = {}
        self.weights: Optional[LayoutFreeReader] = None
        self.on_record: Callable[[SaveRecord], None] = lambda record: None
        # Why run.dir is no longer this run's to write (its lock was taken over), or None; asked on rank 0 before a
        # save starts and before one is sealed (the sealing prunes): set by train/run.py from run.dir's lock.
        self.disowned: Callable[[], Optional[str]] = lambda: None
        self.failures = 0  # consecutive saves that did not complete
        self.last: Optional[SaveRecord] = None
        self._owners: List[Any] = []
        self._engine = self._param_names = None
        self._buffers = SnapshotBuffers()
        self._in_flight: Optional[BackgroundWrite] = None
        self._removal = BackgroundRemoval()  # rank 0's deletion of pruned checkpoints
        self._state_in_flight: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ resume

    def open(self) -> None:
        """Collective: choose the checkpoint to resume from (none: a fresh start)."""
        world = self.rank.world
        if world.size > 1:
            _cpu_group()  # created by every rank together, now, rather than at whichever call first needs it
        if self.candidates:
            self.folder = first_verified(self.candidates, lambda f: verify_checksums(f, world.rank, world.size),
                                         self.log.warn)
            self.state = read_state(self.folder)
            self.weights = LayoutFreeReader(self.folder / "model")

    @property
    def start_step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def same_layout(self) -> bool:
        """The checkpoint was written by this very layout: each rank's random streams continue too."""
        return self.folder is not None and same_layout(self.state, self.rank.layout)

    @property
    def fresh_streams_from(self) -> int:
        """The step from which dropout's random streams are seeded anew: 0 for a fresh start or an exact resume
        (whose random states are restored), the checkpoint's step for a resume in another layout."""
        return 0 if self.folder is None or self.same_layout else self.start_step

    def restore(self, engine, param_names: Dict[int, str]) -> None:
        """The chosen checkpoint into the engine built from its weights (param_names: parameter id -> name)."""
        self._engine, self._param_names = engine, param_names
        if self.folder is None:
            return
        fragments.restore(engine, param_names, self.weights, self.rank.topology, self.rank.precision)
        engine_state.restore(engine, self.state.get("optimizer"), self.start_step, self.cfg.train)
        if self.same_layout:
            path = self.folder / "rng" / f"rank{self.rank.world.rank:05d}.safetensors"
            file = SafetensorsFile(path)
            rng.restore({k: file.read(k) for k in file.keys()}, file.metadata, str(path))
        moved = "" if self.same_layout else " (layout changed: weights and optimizer moments re-cut for this layout)"
        self.log.info(f"gptdist | resumed from {self.folder} at step {self.start_step}{moved}")
        changed = [c for c in config_changes(self.state.get("config") or {}, self.cfg.to_dict())
                   if not c.startswith(("run.", "resume:"))]
        if changed:
            self.log.info(f"gptdist | the config differs from the checkpoint's; this run follows the new one: "
                          f"{'; '.join(changed)}")

    # -------------------------------------------------------------------------------------------------- save

    def keep_state_of(self, *owners: Any) -> None:
        """Objects with checkpoint_state() -> dict whose entries go into every checkpoint's state."""
        self._owners.extend(owners)

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0) or (last and self.cfg.checkpoint.at_end)

    def after_step(self, step: int, last: bool) -> bool:
        """Collective. Saves when due (True: a save of this step was started), and completes a save in flight once
        every rank has written its part."""
        if self.due(step, last):
            return self.save(step)
        self._poll()
        return False

    @property
    def gave_up(self) -> bool:
        return self.failures >= self.cfg.checkpoint.max_failed_saves

    def save(self, step: int) -> bool:
        """Collective. Starts the save of `step` (synchronous saves also complete it). False when it cannot even
        start (no room, run.dir not writable): counted as failed; the previous checkpoints are kept."""
        self._finish()  # one save in flight at a time
        start = time.perf_counter()
        world = self.rank.world
        folder = partial_folder(self.root, step)
        if self._removal.deleting(folder):
            self._removal.wait()  # a leftover of this step's name is being deleted: never write into it
        problem = self._storage_problem()
        failed = _any_rank(bool(problem))
        if failed and _any_rank(self._removal.wait()):  # the decision taken together
            # Rank 0 was still deleting a pruned checkpoint: the room may be what that deletion frees. Once more.
            if world.size > 1:
                dist.barrier()
            problem = self._storage_problem()
            failed = _any_rank(bool(problem))
        if failed:
            self._failed(SaveRecord(step, False, 0.0, 0.0, 0,
                                    problem or "another rank cannot write its part of the checkpoint"))
            return False
        if world.is_main and folder.exists():
            shutil.rmtree(folder)  # an earlier attempt's interrupted save of the same step
        if world.size > 1:
            dist.barrier()
        state = self._state(step)  # every rank: the owners' states may need a collective (the metrics' flush)
        snapshot = take_snapshot(self._engine, self._param_names, self.rank.topology, world.rank, step,
                                 state if world.is_main else None, self._buffers)
        snapshot.blocking_s = time.perf_counter() - start
        self._state_in_flight = state
        write = BackgroundWrite(snapshot, folder, self.rank.topology.tp_rank, self.drills)
        if self.cfg.checkpoint.async_:
            self._in_flight = write.start()
        else:
            self._in_flight = write.run_here()
            self._finish(sync_start=start)
        return True

    def _storage_problem(self) -> Optional[str]:
        world = self.rank.world
        return (self.disowned() if world.is_main else None) or storage_problem(self.root, world.rank)

    def _state(self, step: int) -> Dict[str, Any]:
        # What the checkpointer owns itself: the format, the step, the config it saves under and the optimizer's
        # counters; the rest comes from its owners (the data position, tokenizer and layout, the MLflow run).
        state: Dict[str, Any] = {"format": FORMAT, "step": step, "config": self.cfg.to_dict(),
                                 "config_digest": self.cfg.digest(), "optimizer": engine_state.capture(self._engine)}
        for owner in self._owners:
            state.update(owner.checkpoint_state())
        return state

    def _poll(self) -> None:
        """Collective, only while a save is in flight: complete it once every rank's write is done."""
        if self._in_flight is not None and not _any_rank(not self._in_flight.done()):
            self._finish()

    def _finish(self, sync_start: Optional[float] = None, training: bool = True) -> Optional[SaveRecord]:
        """Collective: wait for this rank's write, then rank 0 seals the checkpoint (or says why it could not).
        sync_start: a synchronous save, whose whole time (snapshot, write and seal) blocked training. training:
        False at the end of the run, where the wait no longer holds a step back (it is still recorded, as seal_s)."""
        write, self._in_flight = self._in_flight, None
        if write is None:
            return None
        seal_start = time.perf_counter()
        write.wait()
        if sync_start is not None:
            write.result.blocking_s = time.perf_counter() - sync_start
        results = _gather(write.result, self.rank.world.size)
        step = write.snapshot.step
        problem = None
        if self.rank.world.is_main:
            problem = self.disowned() or commit(self.root, step, results, self.rank.layout.tp,
                                                self._state_in_flight, self.cfg.checkpoint.keep, self._removal)
        problem = _from_main(problem, self.rank.world.size)
        seal = time.perf_counter() - seal_start  # rank 0's: the seal's time, which the other ranks waited for
        blocking = max(r.blocking_s for r in results)
        if sync_start is not None:
            blocking = max(blocking, time.perf_counter() - sync_start)  # the seal too
        elif training:
            blocking += seal  # a background save still holds training back while it is sealed
        record = SaveRecord(step, problem is None, blocking, max(r.write_s for r in results),
                            sum(r.nbytes for r in results), problem, seal)
        if problem is None:
            self.failures = 0
            self.last = record
            self.on_record(record)
            self.drills.kill_if_due("kill-after-save", step)
        else:
            self._failed(record)
        return record

    def _failed(self, record: SaveRecord) -> None:
        self.failures += 1
        self.last = record
        self.on_record(record)
        self.log.error(f"checkpoint of step {record.step} not saved: {record.problem}; the previous checkpoints are "
                       f"kept ({self.failures} failed save(s) in a row, checkpoint.max_failed_saves="
                       f"{self.cfg.checkpoint.max_failed_saves}); free space or fix run.dir before the next save")

    @property
    def snapshot_bytes(self) -> int:
        """Host memory the snapshots hold (allocated at the first save, reused)."""
        return self._buffers.nbytes

    # --------------------------------------------------------------------------------------------------- end

    def close(self) -> Optional[SaveRecord]:
        """Collective, at the end of a run: the save in flight completed. Returns the last save's record."""
        self._finish(training=False)
        self._removal.wait()
        return self.last

    def abandon(self, timeout_s: float = 120.0) -> None:
        """After a fatal error, on this rank alone: no collective is possible any more. Wait (bounded) for this rank's
        write, and say that the save in flight is not a checkpoint."""
        write, self._in_flight = self._in_flight, None
        if write is None:
            return
        write.wait(timeout_s)
        self.log.error(f"the checkpoint of step {write.snapshot.step} was being written when the run failed and is "
                       "not complete; a resume starts from the newest complete checkpoint")


def _any_rank(flag: bool) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(value.item())


def _gather(value, world_size: int) -> List[Any]:
    if world_size == 1:
        return [value]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, value, group=_cpu_group())
    return out


def _from_main(value, world_size: int):
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    return box[0]


_GROUP = None


def _cpu_group():
    """A gloo group for the checkpoint's small agreements: CPU tensors and objects, whatever backend trains."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _GROUP


__all__ = ["Checkpointer", "SaveRecord", "WriteResult"]
