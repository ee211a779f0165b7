"""One rank of a training run: build it (train/run.py), run its optimizer steps, end it (train/outcome.py).

Every object a step touches is named in `run_steps`, all of them built by train/run.py:
* `stepper` (train/stepper.py): one optimizer step (lr, loss kept on the device, grad norm, fault drills);
* `telemetry` (telemetry/telemetry.py): what rank 0 reports (progress bar, metrics.jsonl, MLflow, memory report,
  profiler); silent elsewhere;
* `times` (telemetry/step_times.py, a StepTimes): where each step's time goes, lap by lap; telemetry writes it;
* `validator` (train/validation.py): held-out loss when due, scored on `run.engine`, the DeepSpeed engine;
* `checkpointer` (checkpoint/checkpointer.py): a save when due, the save in flight completed;
* `stop` (train/stop.py): a stop signal agreed across ranks, on `run.engine.device`;
* the outcome (train/outcome.py) each way out returns, with `run.cfg`'s limits and `run.run_dir` in its message.
"""

from __future__ import annotations

from gptdist.config import RunConfig
from gptdist.train import outcome
from gptdist.train.outcome import Outcome
from gptdist.train.run import Run, build_run


def train(cfg: RunConfig) -> int:
    """The exit status of this rank: 0 finished or stopped (resumable), 3 too many bad steps, 4 not saved, 5 run.dir
    taken over by another job."""
    run = build_run(cfg)
    try:
        result = run_steps(run)
    except BaseException:
        run.checkpointer.abandon()  # no collective is possible now: say what the save in flight will not be
        run.lock.release()
        raise
    return outcome.tear_down(result, run)


def run_steps(run: Run) -> Outcome:
    stepper, telemetry, validator, checkpointer, stop, times = (run.stepper, run.telemetry, run.validator,
                                                                run.checkpointer, run.stop, run.times)
    for step in range(run.start_step + 1, run.steps + 1):
        last = step == run.steps
        times.begin(step)
        result = stepper.step(step)
        times.lap("model")
        telemetry.record_step(step, result, last)
        times.lap("telemetry")
        if telemetry.too_many_bad_steps:
            return outcome.bad_steps(step, telemetry.consecutive_bad_steps, run.cfg.train.max_bad_steps, run.run_dir)
        if validator.due(step, last):
            telemetry.flush()  # the steps' times end here, before the validation's
            times.lap("telemetry")
            telemetry.record_validation(step, *validator.run(run.engine))
            times.lap("validation")
        saved = checkpointer.after_step(step, last)  # a save when due; one in flight completed when written
        times.lap("checkpoint")
        stopping = stop.agreed(run.engine.device)  # the last step too: run.dir's lock may have been lost
        times.lap("stop")
        if stop.lost:  # another job holds run.dir now: the checkpointer saved and pruned nothing there
            return outcome.lock_lost(step, stop.disowned() or "run.dir's lock was taken over by another job")
        if checkpointer.gave_up:
            return outcome.saves_failed(step, checkpointer.failures, run.cfg.checkpoint.max_failed_saves, run.run_dir)
        if stopping and not last:
            if not saved:
                checkpointer.save(step)
            return outcome.stopped(step, stop.name or "a signal to another rank")
    return outcome.finished(run.steps, run.run_dir)
