"""Opt-in measurements of a training run, written per rank to RUN_DIR/profile/rank_<r>.json.

    profile.comms=true     DeepSpeed's comms logger (enabled in the generated DeepSpeed JSON), reset once the engine
                           is built so that its totals cover the training steps only: {op: {message bytes: calls}}
    profile.pipeline=true  every instruction of the pipeline schedule (forward, backward, send/recv, reduce,
                           optimizer) timed per train_batch call, from which `gptdist bench parallel` computes each
                           stage's idle (bubble) fraction

`gptdist bench parallel` and `gptdist plan --measure` switch these on with overrides, so benchmarks, the planner and
training all measure through the same code. The memory report (telemetry/memory.py) is on by default.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


class RunProfiler:
    def __init__(self, cfg, run_dir: Path, rank: int) -> None:
        self.comms, self.pipeline = cfg.comms, cfg.pipeline
        self.folder, self.rank = run_dir / "profile", rank
        self.stage: Optional[int] = None
        self.pipe_steps: List[Dict[str, float]] = []

    @property
    def enabled(self) -> bool:
        return self.comms or self.pipeline

    def attach(self, engine) -> None:
        """After the engine is built, before the first step."""
        if self.comms:
            # deepspeed: slow to import, only when the profiler attaches
            import deepspeed.comm as ds_comm

            ds_comm.comms_logger.reset_data()  # start-up broadcasts are not per-step traffic
        # deepspeed: slow to import, only when the profiler attaches
        from deepspeed.runtime.pipe.engine import PipelineEngine

        if self.pipeline and isinstance(engine, PipelineEngine):
            self.stage = engine.stage_id
            self._time_instructions(engine)

    def _time_instructions(self, engine) -> None:
        current: Dict[str, float] = {}

        def timed(name, fn):
            def run(self_, *args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(self_, *args, **kwargs)
                finally:
                    current[name] = current.get(name, 0.0) + time.perf_counter() - start
            return run

        # An instance attribute shadows the class's table for this engine only (the schedule looks it up on self).
        engine._INSTRUCTION_MAP = {kind: timed(kind.__name__, fn) for kind, fn in type(engine)._INSTRUCTION_MAP.items()}
        train_batch = engine.train_batch

        def timed_train_batch(*args, **kwargs):
            current.clear()
            start = time.perf_counter()
            out = train_batch(*args, **kwargs)
            self.pipe_steps.append({**current, "train_batch": time.perf_counter() - start})
            return out

        engine.train_batch = timed_train_batch

    def finish(self) -> None:
        if not self.enabled:
            return
        record: Dict[str, Any] = {"rank": self.rank, "stage": self.stage, "comms": {}, "pipe_steps": self.pipe_steps}
        if self.comms:
            # deepspeed: slow to import, only when the profiler finishes
            import deepspeed.comm as ds_comm

            record["comms"] = {name: {str(size): vals[0] for size, vals in sizes.items()}  # op -> bytes -> calls
                               for name, sizes in ds_comm.comms_logger.comms_dict.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank_{self.rank}.json").write_text(json.dumps(record))


def read_profiles(run_dir: Path) -> Dict[int, Dict[str, Any]]:
    """Every rank's profile of a run, by rank."""
    # torch: telemetry.memory imports torch; bench parallel reads profiles without it
    from gptdist.telemetry.memory import read_rank_records

    return read_rank_records(run_dir / "profile")
