"""Building one rank's training run, once, in the order that matters; train/loop.py then runs it.

    config -> preflight (everything refusable, no process group yet) -> the rank started (device, process group,
    topology) -> the checkpoint chosen (checksums verified together) -> the CPU peak -> the memory report
    -> the model and DeepSpeed engine -> the random streams -> the checkpoint restored -> telemetry, data, validation

Three orders are deliberate:
* the CPU peak (MFU's denominator) is measured before the memory report starts, so its test matrices are not
  counted as the run's memory;
* the memory report starts before the model exists, so its CPU allocation trace sees every tensor the model holds;
* the ranks are seeded after the engine is built, so nothing drawn before training (the initialization, the CPU
  peak's matrices, cached or not) moves dropout's streams; a same-layout restore then sets each rank's saved states.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from gptdist.checkpoint.checkpointer import Checkpointer
from gptdist.config import RunConfig
from gptdist.engine.build import build_training_engine
from gptdist.engine.process import Rank, discover_world, start_rank
from gptdist.telemetry.log import RankZeroLog
from gptdist.telemetry.memory import MemoryReport
from gptdist.telemetry.peak import job_peak_flops
from gptdist.telemetry.profiling import RunProfiler
from gptdist.telemetry.step_times import StepTimes
from gptdist.telemetry.telemetry import Telemetry
from gptdist.train.drills import FaultDrills
from gptdist.train.feed import DataFeed
from gptdist.train.preflight import preflight
from gptdist.train.run_lock import RunLock
from gptdist.train.seeding import seed_rank
from gptdist.train.stepper import Stepper
from gptdist.train.stop import StopRequest
from gptdist.train.validation import NoValidation, Validator


@dataclass
class Run:
    """Every object a training step touches, built once."""

    cfg: RunConfig
    rank: Rank
    engine: object  # the DeepSpeed engine (deepspeed.DeepSpeedEngine or PipelineEngine)
    stepper: Stepper
    feed: DataFeed
    telemetry: Telemetry
    validator: Union[Validator, NoValidation]
    checkpointer: Checkpointer
    stop: StopRequest
    lock: RunLock  # run.dir's, held by rank 0
    times: StepTimes  # where each step's time goes (telemetry writes it)

    @property
    def start_step(self) -> int:
        return self.checkpointer.start_step

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)


def build_run(cfg: RunConfig) -> Run:
    world = discover_world()
    log = RankZeroLog(world.is_main)
    # Everything that can be refused is refused here, before any rank waits on another (`gptdist check` too).
    checked = preflight(cfg, world.size, log.warn, probe_tracking=world.is_main, take_lock=world.is_main)
    try:
        return _build(cfg, world, log, checked)
    except BaseException:
        checked.lock.release()
        raise


def _build(cfg: RunConfig, world, log: RankZeroLog, checked) -> Run:
    if checked.tracking_warning:
        log.warn(checked.tracking_warning)
        cfg.tracking.enabled = False
    rank = start_rank(cfg, world, checked.layout)
    drills = FaultDrills(world.rank)
    checkpointer = Checkpointer(cfg, rank, checked.candidates, log, drills)
    checkpointer.disowned = lambda: checked.lock.lost  # nothing saved or pruned once another job holds run.dir
    checkpointer.open()
    job_peak = job_peak_flops(cfg.train.peak_flops, rank.device_type, rank.precision, world.size, world.local_size,
                              world.is_main)
    memory = MemoryReport(cfg.profile.memory, cfg.profile.memory_step, Path(cfg.run.dir), rank,
                          rank.layout.record())
    memory.start()
    engine, step_fn, param_names = build_training_engine(cfg, rank, checkpointer.weights, drills)
    memory.watch(engine)
    profiler = RunProfiler(cfg.profile, Path(cfg.run.dir), world.rank)
    profiler.attach(engine)
    seed_rank(cfg.train.seed, rank.topology.dp_rank, rank.topology.pp_rank, checkpointer.fresh_streams_from)
    checkpointer.restore(engine, param_names)
    telemetry = Telemetry.open(cfg, rank, memory=memory, profiler=profiler, job_peak=job_peak,
                               resumed=checkpointer.state, start_step=checkpointer.start_step,
                               needs_dp_mean=step_fn.needs_dp_mean, log=log, resumed_from=checkpointer.folder)
    feed = DataFeed(cfg, rank, Path(cfg.run.dir), checkpointer.state.get("data_state"), checked.tokenizer.identity)
    validator = Validator(cfg, rank, checked.tokenizer, log) if cfg.eval.enabled else NoValidation()
    checkpointer.keep_state_of(feed, rank, telemetry)
    checkpointer.on_record = telemetry.record_checkpoint
    memory.host_buffers["checkpoint_snapshot"] = lambda: checkpointer.snapshot_bytes
    times = StepTimes(lambda: feed.wait_s, checkpointer.start_step)
    telemetry.report_step_times(times)
    engine.train()
    return Run(cfg, rank, engine, Stepper(engine, step_fn, feed.batches, drills), feed, telemetry, validator,
               checkpointer, StopRequest(world.size, lambda: checked.lock.lost), checked.lock, times)
