"""How a training run ends: one teardown path for every outcome.

    finished    all steps done: run_complete.json, MLflow run FINISHED, exit 0
    stopped     a signal (Slurm's warning, Ctrl-C, scancel): the checkpoint is saved, stopped.json, KILLED, exit 0
                (the job resumes from there)
    bad steps   train.max_bad_steps non-finite losses in a row: nothing saved (the newest checkpoint is the last
                good one), FAILED, exit 3

Every rank runs the teardown: the loader's workers, the checkpoint writer, the memory report and the profiler
close on every rank; rank 0 closes metrics.jsonl, writes the record and ends the MLflow run; all ranks leave
together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

COMPLETE_FILE = "run_complete.json"
STOPPED_FILE = "stopped.json"


@dataclass
class Outcome:
    kind: str  # "finished" | "stopped" | "bad steps"
    step: int
    message: str
    signal: str = ""

    @property
    def failed(self) -> bool:
        return self.kind == "bad steps"

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

    @property
    def mlflow_status(self) -> str:
        return {"finished": "FINISHED", "stopped": "KILLED"}.get(self.kind, "FAILED")

    def record(self, mlflow_run_id: Optional[str]) -> Optional[Tuple[str, Dict[str, Any]]]:
        """(file in the run directory, its JSON) saying how the run ended, where there is one."""
        if self.kind == "finished":
            return COMPLETE_FILE, {"steps": self.step, "mlflow_run_id": mlflow_run_id}
        if self.kind == "stopped":
            return STOPPED_FILE, {"step": self.step, "signal": self.signal}
        return None


def clear_records(run_dir: Path) -> None:
    """Rank 0, as a run starts: the records of an earlier attempt no longer describe this run."""
    for name in (STOPPED_FILE, COMPLETE_FILE):
        (run_dir / name).unlink(missing_ok=True)


def finished(step: int, run_dir: Path) -> Outcome:
    return Outcome("finished", step, f"gptdist | finished {step} steps; metrics in {run_dir / 'metrics.jsonl'}")


def stopped(step: int, signal: str) -> Outcome:
    return Outcome("stopped", step, f"gptdist | stopped after step {step} on {signal}; checkpoint saved; run again "
                                    "with resume=auto to continue", signal)


def bad_steps(step: int, consecutive: int, limit: int, run_dir: Path) -> Outcome:
    return Outcome("bad steps", step, f"stopping at step {step}: {consecutive} consecutive steps had a non-finite "
                   f"loss (train.max_bad_steps={limit}); the newest checkpoint in {run_dir / 'checkpoints'} is the "
                   "last good one. Lower train.lr, raise train.warmup_steps or check the data, then resume")


def tear_down(outcome: Outcome, run) -> int:
    """Every rank, whatever the outcome (run: train.run.Run). Returns the exit status."""
    import torch.distributed as dist

    run.feed.close()
    run.checkpointer.close()
    run.telemetry.close(outcome)
    dist.barrier()
    return outcome.exit_code
