"""One rank of a training run, from validated config to the completion record.

    config -> layout, data and resume checks (no process group yet) -> process group -> topology
      -> checkpoint chosen (checksums verified together) -> model (tensor parallel plan, pipeline stages)
      -> DeepSpeed engine -> state restored -> loop over optimizer steps -> metrics, MLflow, checkpoints
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict


from gptdist.config import RunConfig, dump_config
from gptdist.model import count_parameters, flops_per_token
from gptdist.parallel.layout import Layout
from gptdist.engine import process as runtime
from gptdist.telemetry.metrics_file import MetricsLog, truncate_metrics
from gptdist.telemetry.peak import job_peak_flops
from gptdist.train.drills import Faults
from gptdist.telemetry.reporter import RankZeroLog, StepReporter, progress_bar
from gptdist.train.stop import StopRequest

from gptdist.train import outcome as ending
from gptdist.train.outcome import COMPLETE_FILE, STOPPED_FILE


def train(cfg: RunConfig) -> int:
    place = runtime.discover_place()
    log = RankZeroLog(place.is_main)
    # Everything that can be refused is refused here, before any rank waits on another (the same checks as
    # `gptdist check`).
    from gptdist.data import build_train_loader
    from gptdist.engine.ds_config import resolve_precision
    from gptdist.train.preflight import preflight

    checked = preflight(cfg, place.world_size, log.warn, probe_tracking=place.is_main)
    layout, tokenizer, candidates = checked.layout, checked.tokenizer, checked.candidates
    if checked.tracking_warning:
        log.warn(checked.tracking_warning)
        cfg.tracking.enabled = False
    device_type = runtime.prepare_process(place)
    precision = resolve_precision(cfg, device_type)
    _quiet_warnings(place.is_main)

    runtime.init_process_group(device_type, timeout_s=600)
    from gptdist.checkpoint.layout_free import LayoutFreeReader
    from gptdist.checkpoint.resume import choose_verified, read_state, restore_moments, restore_same_layout, same_layout
    from gptdist.checkpoint.store import SaveContext, save_checkpoint
    from gptdist.parallel.topology import Topology
    from gptdist.engine.build import build_training_engine, quiet_deepspeed
    from gptdist.telemetry.memory import MemoryReport
    from gptdist.telemetry.profiling import RunProfiler
    from gptdist.engine.steps import DataPosition
    from gptdist.telemetry.tracking import NullTracker, flatten, start_tracker

    quiet_deepspeed(place.is_main)
    topology = Topology(layout, place.rank)
    run_dir = Path(cfg.run.dir)

    resume_from = choose_verified(candidates, place.rank, place.world_size, log.warn) if candidates else None
    state: Dict[str, Any] = read_state(resume_from) if resume_from else {}
    start_step = int(state.get("step", 0))
    exact = resume_from is not None and same_layout(state, layout)
    weights = LayoutFreeReader(resume_from / "model") if resume_from is not None and not exact else None
    faults = Faults(place.rank)
    # Measured (CPU: every rank at once) before the memory report starts: its test matrices are not the run's memory.
    job_peak = job_peak_flops(cfg.train.peak_flops, device_type, precision, place.world_size,
                              place.local_world_size, place.is_main)
    memory = MemoryReport(cfg.profile.memory, cfg.profile.memory_step, run_dir, place, topology, device_type,
                          layout_record(layout))
    memory.start()  # before the model exists: the CPU allocation trace must see every tensor it holds
    engine, step_fn, names = build_training_engine(cfg, layout, topology, device_type, precision, weights, faults)
    memory.watch(engine)
    profiler = RunProfiler(cfg.profile, run_dir, place.rank)
    profiler.attach(engine)
    from gptdist.train.seeding import seed_rank

    # Dropout's streams, per rank, seeded once everything before training has drawn what it draws (a same-layout
    # resume then restores each rank's saved states instead).
    seed_rank(cfg.train.seed, topology.dp_rank, topology.pp_rank, 0 if exact else start_step)
    if resume_from is not None:
        if exact:
            restore_same_layout(engine, resume_from, place.rank, cfg.train)
        else:
            restore_moments(engine, names, weights, topology, start_step)
        log.info(f"gptdist | resumed from {resume_from} at step {start_step}"
                 f"{'' if exact else ' (layout changed: weights and optimizer moments re-cut for this layout)'}")
        from gptdist.engine.optim import config_changes

        changed = [c for c in config_changes(state.get("config") or {}, cfg.to_dict())
                   if not c.startswith(("run.", "resume:"))]
        if changed:
            log.info(f"gptdist | the config differs from the checkpoint's; this run follows the new one: "
                     f"{'; '.join(changed)}")

    tracker = NullTracker()
    metrics = None
    if place.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for marker in (STOPPED_FILE, COMPLETE_FILE):
            (run_dir / marker).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        # Steps after the checkpoint were done by a run that died; they are about to be done again.
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        tracker = start_tracker(cfg.tracking, run_dir, cfg.run.name or run_dir.name, flatten(cfg.to_dict()),
                                resumed=state if start_step else None, warn=log.warn)
        tracker.log_artifact(run_dir / "config.yaml")

    fpt = flops_per_token(cfg.model)
    tokens_per_step = layout.global_batch_size * cfg.model.seq_len
    log.info(f"gptdist | {count_parameters(cfg.model) / 1e6:.2f} M parameters | {layout.describe()} | "
             f"{precision} on {device_type}")
    log.info(f"gptdist | run dir {run_dir} | {tokens_per_step} tokens/step | tracking run {tracker.run_id}")
    if layout.pp > 1 and layout.bubble_fraction > 0.25:
        log.warn(f"pipeline bubble: {layout.grad_accum} micro-batches over {layout.pp} stages leave the stages idle "
                 f"{layout.bubble_fraction:.0%} of each step; raise train.global_batch_size or lower micro_batch_size")

    position = DataPosition(state.get("data_state") or {})
    loader, batches = None, None
    if topology.needs_data:
        from gptdist.train.feed import DataReport, data_sharing

        loader = build_train_loader(
            cfg.data, seq_len=cfg.model.seq_len, micro_batch_size=layout.micro_batch_size,
            dp_rank=topology.dp_rank, dp_size=layout.dp, seed=cfg.train.seed, state=position.state,
            sharing=data_sharing(cfg, topology, place, run_dir),
        )
        loader = DataReport(loader, run_dir, place.rank)  # closing it writes RUN_DIR/data/rank_<r>.json
        batches = position.track(iter(loader), engine.device)

    steps = cfg.train.steps
    reporter = StepReporter(
        tokens_per_step=tokens_per_step, samples_per_step=layout.global_batch_size,
        flops_per_token=fpt, job_peak_flops=job_peak,
        dp_group=topology.dp_group if step_fn.needs_dp_mean else None, dp_size=layout.dp, metrics=metrics,
        tracker=tracker, progress=progress_bar(place.is_main, start_step, steps), warn=log.warn,
    )
    validator = None
    if cfg.eval.enabled:
        from gptdist.train.validation import Validator

        validator = Validator(cfg, layout, topology, tokenizer, engine.device)
        log.info(f"gptdist | validation on the first {validator.samples} windows of {cfg.eval.source.path}"
                 f"{f' every {cfg.eval.every} steps' if cfg.eval.every else ''}"
                 f"{' and at the end' if cfg.eval.at_end else ''}")
    saver = SaveContext(engine, names, topology, cfg, run_dir, place.rank, place.world_size, faults)
    stop = StopRequest()

    def save(step: int) -> None:
        reporter.flush()
        problem = save_checkpoint(saver, step, {
            "format": 1, "step": step, "data_state": position.state, "config": cfg.to_dict(),
            "config_digest": cfg.digest(), "tokenizer": tokenizer.identity, "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "layout": layout_record(layout),
        }, keep=cfg.checkpoint.keep)
        if problem:
            log.error(f"checkpoint of step {step} not saved: {problem}; the previous checkpoints are kept and "
                      "training goes on (free space or fix run.dir before the next save)")

    engine.train()
    outcome = None
    for step in range(start_step, steps):
        lr = engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside the step
        done = step + 1
        loss = step_fn(batches, done)
        reporter.add(done, loss, lr, engine.get_global_grad_norm())
        memory.after_step(done - start_step, done, log, tracker)  # the N-th step of this process
        faults.at("kill", done)
        last = done == steps
        if done % cfg.train.log_every == 0 or last or cfg.train.max_bad_steps < cfg.train.log_every:
            reporter.flush()
        if reporter.consecutive_bad >= cfg.train.max_bad_steps:
            outcome = ending.bad_steps(done, reporter.consecutive_bad, cfg.train.max_bad_steps, run_dir)
            break
        if validator is not None and validator.due(done, last):
            reporter.flush()  # the steps' times end here, before the validation's
            reporter.add_validation(done, *validator.run(engine))
        saved = False
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.at_end):
            save(done)
            saved = True
            faults.at("kill-after-save", done)
        if not last and stop.agreed(engine.device):
            if not saved:
                save(done)
            outcome = ending.stopped(done, stop.name or "a signal to another rank")
            break
    outcome = outcome or ending.finished(steps, run_dir)
    return ending.tear_down(outcome, is_main=place.is_main, run_dir=run_dir, metrics=metrics, tracker=tracker,
                            closers=[reporter, memory, profiler, loader], log=log,
                            before_finish=lambda: _plot_for_tracking(run_dir, tracker, log))


def layout_record(layout: Layout) -> Dict[str, int]:
    return {k: getattr(layout, k) for k in ("tp", "pp", "dp", "zero_stage", "micro_batch_size", "grad_accum")}


def _quiet_warnings(is_main: bool) -> None:
    if not is_main:
        warnings.filterwarnings("ignore")
    # torch.distributed's deprecation notices are about DeepSpeed's calls, not anything a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # The pipeline engine passes activations between stages with broadcasts inside autograd; torch warns that
    # broadcast has no autograd kernel, but DeepSpeed sends the gradients back itself.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel")


def _plot_for_tracking(run_dir: Path, tracker, log) -> None:
    """The curves as a PNG artifact of the MLflow run (rank 0, at the end)."""
    if tracker.run_id is None or not (run_dir / "metrics.jsonl").exists():
        return
    from gptdist.telemetry.plot import PLOT_FILE, plot_run

    try:
        tracker.log_artifact(plot_run(run_dir / "metrics.jsonl", run_dir / PLOT_FILE))
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
        log.warn(f"the training-curve plot was not made ({type(exc).__name__}: {exc})")
