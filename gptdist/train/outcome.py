"""How a training run ends: one teardown path for every outcome.

    finished    all steps done: run_complete.json, MLflow run FINISHED, exit 0
    stopped     a signal (Slurm's warning, Ctrl-C, scancel): the checkpoint is saved, stopped.json, KILLED, exit 0
                (the job resumes from there)
    bad steps   train.max_bad_steps non-finite losses in a row: nothing saved (the newest checkpoint is the last
                good one), FAILED, exit 3

Every rank runs it: the loader's workers, the memory report and the profiler close on every rank; rank 0 closes
metrics.jsonl, writes the completion record and ends the MLflow run; all ranks leave together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

COMPLETE_FILE = "run_complete.json"
STOPPED_FILE = "stopped.json"


@dataclass
class Outcome:
    kind: str  # "finished" | "stopped" | "bad steps"
    step: int
    message: str
    signal: str = ""

    @property
    def exit_code(self) -> int:
        return 3 if self.kind == "bad steps" else 0

    @property
    def mlflow_status(self) -> str:
        return {"finished": "FINISHED", "stopped": "KILLED"}.get(self.kind, "FAILED")


def finished(step: int, run_dir: Path) -> Outcome:
    return Outcome("finished", step, f"gptdist | finished {step} steps; metrics in {run_dir / 'metrics.jsonl'}")


def stopped(step: int, signal: str) -> Outcome:
    return Outcome("stopped", step, f"gptdist | stopped after step {step} on {signal}; checkpoint saved; run again "
                                    "with resume=auto to continue", signal)


def bad_steps(step: int, consecutive: int, limit: int, run_dir: Path) -> Outcome:
    return Outcome("bad steps", step, f"stopping at step {step}: {consecutive} consecutive steps had a non-finite "
                   f"loss (train.max_bad_steps={limit}); the newest checkpoint in {run_dir / 'checkpoints'} is the "
                   "last good one. Lower train.lr, raise train.warmup_steps or check the data, then resume")


def tear_down(outcome: Outcome, *, is_main: bool, run_dir: Path, closers: List[Any], metrics, tracker,
              before_finish: Optional[Callable[[], None]] = None, log) -> int:
    """closers: objects with close() or finish() (reporter, memory report, profiler, loader), closed in order on
    every rank; before_finish: rank 0's last words to the tracker (the plot) before its run ends."""
    import torch.distributed as dist

    for thing in closers:
        if thing is not None:
            (getattr(thing, "close", None) or thing.finish)()
    if is_main:
        if metrics is not None:
            metrics.close()
        if outcome.kind == "finished":
            (run_dir / COMPLETE_FILE).write_text(json.dumps({"steps": outcome.step,
                                                             "mlflow_run_id": tracker.run_id}) + "\n")
        elif outcome.kind == "stopped":
            (run_dir / STOPPED_FILE).write_text(json.dumps({"step": outcome.step, "signal": outcome.signal}) + "\n")
        if before_finish is not None:
            before_finish()
        tracker.finish(outcome.mlflow_status)
        (log.error if outcome.kind == "bad steps" else log.info)(outcome.message)
    dist.barrier()
    return outcome.exit_code
