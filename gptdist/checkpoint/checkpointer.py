"""The Checkpointer: everything a training run does with checkpoints, behind five calls.

    open()                 the newest complete checkpoint whose checksums hold (all ranks verify together), falling
                           back past damaged ones; its state (step, data position, MLflow run, ...)
    restore(engine, ...)   that checkpoint into the engine: same layout exactly, another layout re-cut
    due(step, last)        whether checkpoint.every / checkpoint.at_end asks for a save after this step
    save(step)             a complete checkpoint (manifest last, `latest` after it, older ones pruned)
    close()                nothing left in flight

The state saved with the weights is collected from the objects that own it (`keep_state_of`): the data feed's
position, the telemetry's MLflow run; the checkpointer adds what it knows itself (step, config, layout, tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from gptdist.checkpoint.layout_free import LayoutFreeReader
from gptdist.checkpoint.locate import first_verified
from gptdist.checkpoint.resume import restore_moments, restore_same_layout, same_layout
from gptdist.checkpoint.store import SaveContext, read_state, save_checkpoint, verify_checksums
from gptdist.config import config_changes

FORMAT = 1


def layout_record(layout) -> Dict[str, int]:
    return {k: getattr(layout, k) for k in ("tp", "pp", "dp", "zero_stage", "micro_batch_size", "grad_accum")}


class Checkpointer:
    def __init__(self, cfg, rank, candidates: List[Path], tokenizer_identity: str, log, drills) -> None:
        """rank: engine.process.Rank; candidates: the checkpoints preflight found, newest first; log: rank-0
        messages (telemetry.log.RankZeroLog); drills: train.drills.FaultDrills."""
        self.cfg, self.rank, self.candidates, self.log, self.drills = cfg, rank, candidates, log, drills
        self.tokenizer_identity = tokenizer_identity
        self.run_dir = Path(cfg.run.dir)
        self.folder: Optional[Path] = None  # the checkpoint resumed from
        self.state: Dict[str, Any] = {}
        # Where the model's values come from when it is built: the checkpoint's layout-free weights when the layout
        # changed (None: the initialization, which a same-layout restore then overwrites).
        self.weights: Optional[LayoutFreeReader] = None
        self._owners: List[Any] = []
        self._saver: Optional[SaveContext] = None

    # ------------------------------------------------------------------------------------------------ resume

    def open(self) -> None:
        """Collective: choose the checkpoint to resume from (none: a fresh start)."""
        world = self.rank.world
        self.folder = first_verified(self.candidates, lambda f: verify_checksums(f, world.rank, world.size),
                                     self.log.warn) if self.candidates else None
        self.state = read_state(self.folder) if self.folder is not None else {}
        if self.folder is not None and not self.same_layout:
            self.weights = LayoutFreeReader(self.folder / "model")

    @property
    def start_step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def same_layout(self) -> bool:
        """The checkpoint was written by this very layout: restored exactly, RNG states included."""
        return self.folder is not None and same_layout(self.state, self.rank.layout)

    @property
    def fresh_streams_from(self) -> int:
        """The step from which dropout's random streams are seeded anew: 0 for a fresh start or an exact resume
        (whose RNG states are restored), the checkpoint's step for a resume in another layout."""
        return 0 if self.folder is None or self.same_layout else self.start_step

    def restore(self, engine, param_names: Dict[int, str]) -> None:
        """The chosen checkpoint into the engine built for this run (param_names: parameter id -> canonical name)."""
        if self.folder is None:
            return
        topology = self.rank.topology
        if self.same_layout:
            restore_same_layout(engine, self.folder, self.rank.world.rank, self.cfg.train)
        else:
            restore_moments(engine, param_names, self.weights, topology, self.start_step)
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

    def attach(self, engine, param_names: Dict[int, str]) -> None:
        world = self.rank.world
        self._saver = SaveContext(engine, param_names, self.rank.topology, self.cfg, self.run_dir, world.rank,
                                  world.size, self.drills)

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0) or (last and self.cfg.checkpoint.at_end)

    def save(self, step: int) -> bool:
        """Collective. True once the checkpoint of `step` is complete; False (and one error line) when it could not
        be written, the previous checkpoints then kept as they were."""
        state = self._state(step)
        problem = save_checkpoint(self._saver, step, state, keep=self.cfg.checkpoint.keep)
        if problem:
            self.log.error(f"checkpoint of step {step} not saved: {problem}; the previous checkpoints are kept and "
                           "training goes on (free space or fix run.dir before the next save)")
            return False
        self.drills.kill_if_due("kill-after-save", step)
        return True

    def _state(self, step: int) -> Dict[str, Any]:
        state: Dict[str, Any] = {"format": FORMAT, "step": step, "config": self.cfg.to_dict(),
                                 "config_digest": self.cfg.digest(), "tokenizer": self.tokenizer_identity,
                                 "layout": layout_record(self.rank.layout)}
        for owner in self._owners:
            state.update(owner.checkpoint_state())
        return state

    def close(self) -> None:
        """Nothing is written in the background yet: every save is complete when save() returns."""

