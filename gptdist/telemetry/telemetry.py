"""Telemetry: the one object through which a training run reports.

On rank 0 it writes the progress bar, RUN_DIR/metrics.jsonl, config.yaml and the MLflow run (params, metrics,
artifacts, with the retry buffer of retry.py), and prints the memory summary; at the end it draws the training
curves. On every other rank it is the same object with no outputs: it still takes part in the collectives that
rank 0's figures need (the data-parallel mean of the losses, the memory summary), so the loop calls it the same way
on every rank and never asks which rank it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from gptdist.config import dump_config
from gptdist.model import count_parameters, flops_per_token
from gptdist.telemetry.log import RankZeroLog
from gptdist.telemetry.metrics_file import MetricsLog, truncate_metrics
from gptdist.telemetry.peak import raise_cpu_peak
from gptdist.telemetry.reporter import StepReporter, progress_bar
from gptdist.telemetry.step_times import StepTimes
from gptdist.telemetry.step_times import describe as describe_step_times
from gptdist.telemetry.tracking import NullTracker, flatten, start_tracker


class Telemetry:
    def __init__(self, cfg, rank, reporter: StepReporter, memory, profiler, metrics: Optional[MetricsLog], tracker,
                 log: RankZeroLog, start_step: int) -> None:
        self.cfg, self.rank, self.reporter, self.memory, self.profiler = cfg, rank, reporter, memory, profiler
        self.metrics, self.tracker, self.log, self.start_step = metrics, tracker, log, start_step
        self.run_dir = Path(cfg.run.dir)
        self.log_every, self.max_bad_steps = cfg.train.log_every, cfg.train.max_bad_steps
        self.times: Optional[StepTimes] = None  # the loop's step-time breakdown (report_step_times)

    @classmethod
    def open(cls, cfg, rank, *, memory, profiler, job_peak: Optional[float], resumed: Optional[Dict[str, Any]],
             start_step: int, needs_dp_mean: bool, log: RankZeroLog,
             resumed_from: Optional[Path] = None) -> "Telemetry":
        """rank: engine.process.Rank; memory, profiler: the memory report and profiler, already watching the engine;
        resumed: the checkpoint's state when resuming, resumed_from its folder (its MLflow run is continued where
        the config's store holds it: telemetry/tracking.py)."""
        metrics, tracker = None, NullTracker()
        if rank.world.is_main:
            metrics, tracker = _open_outputs(cfg, resumed if start_step else None, start_step, log, resumed_from)
        layout = rank.layout
        _announce(cfg, rank, tracker, log)  # before the progress bar appears
        reporter = StepReporter(
            tokens_per_step=layout.global_batch_size * cfg.model.seq_len, samples_per_step=layout.global_batch_size,
            flops_per_token=flops_per_token(cfg.model), job_peak_flops=job_peak,
            dp_group=rank.topology.dp_group if needs_dp_mean else None, dp_size=layout.dp, metrics=metrics,
            tracker=tracker, progress=progress_bar(rank.world.is_main, start_step, cfg.train.steps), warn=log.warn,
            peak_exceeded=_peak_raiser(cfg, rank))
        return cls(cfg, rank, reporter, memory, profiler, metrics, tracker, log, start_step)

    def report_step_times(self, times: StepTimes) -> None:
        """The loop's step-time breakdown: rank 0 writes it (step_times.json) and says where the time went at close."""
        self.times = times

    # ------------------------------------------------------------------------------------------- during training

    def record_step(self, step: int, result, last: bool) -> None:
        """After optimizer step `step`: its record joins the logging window, which closes (one host sync, one
        collective) every train.log_every steps, at the last step, and at every step while bad steps are counted
        more finely than that."""
        self.reporter.add(step, result.loss, result.lr, result.grad_norm)
        self.memory.after_step(step - self.start_step, step, self.log, self.tracker)
        if step % self.log_every == 0 or last or self.max_bad_steps < self.log_every:
            self.reporter.flush()

    @property
    def too_many_bad_steps(self) -> bool:
        return self.reporter.consecutive_bad >= self.max_bad_steps

    @property
    def consecutive_bad_steps(self) -> int:
        return self.reporter.consecutive_bad

    def record_validation(self, step: int, loss: float, samples: int) -> None:
        self.reporter.add_validation(step, loss, samples)

    def flush(self) -> None:
        """Close the logging window now (collective): the steps' times end here."""
        self.reporter.flush()

    def record_checkpoint(self, record) -> None:
        """A save that completed or failed (checkpoint.checkpointer.SaveRecord): what it cost training (seconds the
        step waited), the background write's seconds and the bytes every rank wrote, under the save's step."""
        if self.metrics is None:
            return
        entry = {"step": record.step, "checkpoint_saved": record.ok, "checkpoint_blocking_s": record.blocking_s,
                 "checkpoint_seal_s": record.seal_s, "checkpoint_write_s": record.write_s,
                 "checkpoint_bytes": record.nbytes}
        self.metrics.write([entry])
        self.tracker.log_metrics([entry])

    def checkpoint_state(self) -> Dict[str, Any]:
        """What a checkpoint records of the reporting: the MLflow run to continue. metrics.jsonl is brought up to
        the checkpoint's step first, so a resume that truncates it after that step loses nothing."""
        self.reporter.flush()
        return {"mlflow_run_id": self.tracker.run_id, "tracking_uri": self.tracker.uri}

    # ---------------------------------------------------------------------------------------------- the end

    def _write_step_times(self) -> None:
        """The breakdown is a report, not the run's outcome: a full disk costs the file, with a warning."""
        try:
            found = self.times.write(self.run_dir)
        except OSError as exc:
            found = self.times.summary()
            self.log.warn(f"could not write {self.run_dir / 'step_times.json'} ({exc.strerror or exc})")
        if found is not None:
            self.log.info("gptdist | " + describe_step_times(found))

    def close(self, outcome) -> None:
        """Every rank: the window, the memory report and the profiler close; rank 0 then closes metrics.jsonl,
        writes the outcome's record (run_complete.json, stopped.json), draws the curves, ends the MLflow run with the
        outcome's status and says how the run ended."""
        self.reporter.close()
        self.memory.finish()
        self.profiler.finish()
        if self.metrics is None:
            return
        self.metrics.close()
        if self.times is not None:
            self._write_step_times()
        record = outcome.record(self.tracker.run_id)
        if record is not None:
            (self.run_dir / record[0]).write_text(json.dumps(record[1]) + "\n")
        self._plot()
        self.tracker.finish(outcome.mlflow_status)
        (self.log.error if outcome.failed else self.log.info)(outcome.message)

    def _plot(self) -> None:
        """The curves as a PNG artifact of the MLflow run."""
        if self.tracker.run_id is None or not (self.run_dir / "metrics.jsonl").exists():
            return
        from gptdist.telemetry.plot import PLOT_FILE, plot_run  # matplotlib: imported only where it draws

        try:
            self.tracker.log_artifact(plot_run(self.run_dir / "metrics.jsonl", self.run_dir / PLOT_FILE))
        except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
            self.log.warn(f"the training-curve plot was not made ({type(exc).__name__}: {exc})")


def _announce(cfg, rank, tracker, log: RankZeroLog) -> None:
    layout = rank.layout
    log.info(f"gptdist | {count_parameters(cfg.model) / 1e6:.2f} M parameters | {layout.describe()} | "
             f"{rank.precision} on {rank.device_type}")
    log.info(f"gptdist | run dir {cfg.run.dir} | {layout.global_batch_size * cfg.model.seq_len} tokens/step | "
             f"tracking run {tracker.run_id}")
    if layout.pp > 1 and layout.bubble_fraction > 0.25:
        log.warn(f"pipeline bubble: {layout.grad_accum} micro-batches over {layout.pp} stages leave the stages idle "
                 f"{layout.bubble_fraction:.0%} of each step; raise train.global_batch_size or lower "
                 "train.micro_batch_size")


def _open_outputs(cfg, resumed: Optional[Dict[str, Any]], start_step: int, log: RankZeroLog,
                  resumed_from: Optional[Path] = None):
    """Rank 0: config.yaml, metrics.jsonl (steps after the checkpoint were done by a run that died and are about to
    be done again: they are dropped) and the MLflow run."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    truncate_metrics(run_dir / "metrics.jsonl", start_step, log.warn)
    metrics = MetricsLog(run_dir / "metrics.jsonl", log.warn)
    tracker = start_tracker(cfg.tracking, run_dir, cfg.run.name or run_dir.name, flatten(cfg.to_dict()),
                            resumed=resumed, warn=log.warn, resumed_from=resumed_from)
    tracker.log_artifact(run_dir / "config.yaml")
    return metrics, tracker


def _peak_raiser(cfg, rank):
    """Where the peak was measured (a CPU without train.peak_flops), rank 0 raises the cached one when exceeded."""
    if rank.device_type != "cpu" or cfg.train.peak_flops or not rank.world.is_main:
        return None
    world = rank.world
    return lambda achieved: raise_cpu_peak(achieved, world.size, world.local_size)
