"""How a training run ends: one teardown path for every outcome.

    finished    all steps done: run_complete.json, MLflow run FINISHED, exit 0
    stopped     a signal (Slurm's warning, Ctrl-C, scancel): the checkpoint is saved, stopped.json, KILLED, exit 0
                (the job resumes from there)
    bad steps   train.max_bad_steps non-finite losses in a row: nothing saved (the newest checkpoint is the last
                good one), FAILED, exit 3
    not saved   the checkpoint that would end the run (the last step's, a stop's) could not be written, or
                checkpoint.max_failed_saves saves failed in a row: not_saved.json instead of a completion record,
                FAILED, exit 4, so that a scheduler runs the job again (it resumes from the newest complete checkpoint;
                slurm/train.sbatch requeues itself)
    lock lost   run.dir's lock was taken over by another job (this one was stopped past its lease): nothing saved or
                pruned there, no record, FAILED, exit 5 (not requeued: the directory is the other job's now)

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
NOT_SAVED_FILE = "not_saved.json"  # slurm/train.sbatch requeues a job that leaves it (bounded)


@dataclass
class Outcome:
    kind: str  # "finished" | "stopped" | "bad steps" | "not saved" | "lock lost"
    step: int
    message: str
    signal: str = ""

    @property
    def failed(self) -> bool:
        return self.kind in ("bad steps", "not saved", "lock lost")

    @property
    def exit_code(self) -> int:
        return {"bad steps": 3, "not saved": 4, "lock lost": 5}.get(self.kind, 0)

    @property
    def mlflow_status(self) -> str:
        return {"finished": "FINISHED", "stopped": "KILLED"}.get(self.kind, "FAILED")

    def record(self, mlflow_run_id: Optional[str]) -> Optional[Tuple[str, Dict[str, Any]]]:
        """(file in the run directory, its JSON) saying how the run ended, where there is one."""
        if self.kind == "finished":
            return COMPLETE_FILE, {"steps": self.step, "mlflow_run_id": mlflow_run_id}
        if self.kind == "stopped":
            return STOPPED_FILE, {"step": self.step, "signal": self.signal}
        if self.kind == "not saved":
            return NOT_SAVED_FILE, {"step": self.step, "reason": self.message}
        return None


def clear_records(run_dir: Path) -> None:
    """Rank 0, as a run starts: the records of an earlier attempt no longer describe this run."""
    for name in (STOPPED_FILE, COMPLETE_FILE, NOT_SAVED_FILE):
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


def saves_failed(step: int, failures: int, limit: int, run_dir: Path) -> Outcome:
    return Outcome("not saved", step, f"stopping at step {step}: {failures} checkpoints in a row could not be saved "
                   f"(checkpoint.max_failed_saves={limit}); the newest complete one is in {run_dir / 'checkpoints'}. "
                   "Free space or fix run.dir, then run again: it resumes from there")


def lock_lost(step: int, why: str) -> Outcome:
    return Outcome("lock lost", step, f"stopping at step {step}: {why}")


def unsaved(result: Outcome, problem: str, run_dir: Path) -> Outcome:
    """A run that finished or stopped, but whose last checkpoint was not written: its work since the newest complete
    checkpoint would be lost, so it must not count as done."""
    return Outcome("not saved", result.step, f"the checkpoint of step {result.step} that ends this run was not saved "
                   f"({problem}); the run is not complete: run it again and it resumes from the newest complete "
                   f"checkpoint in {run_dir / 'checkpoints'}", result.signal)


def tear_down(result: Outcome, run) -> int:
    """Every rank, whatever the outcome (run: train.run.Run). Returns the exit status."""
    # torch: only at teardown; this module imports without it
    import torch.distributed as dist

    run.feed.close()
    last = run.checkpointer.close()
    if result.kind in ("finished", "stopped") and last is not None and last.step == result.step and not last.ok:
        result = unsaved(result, last.problem or "unknown", run.run_dir)
    run.telemetry.close(result)
    run.lock.release()
    dist.barrier()
    return result.exit_code
