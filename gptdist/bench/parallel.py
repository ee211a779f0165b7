"""`gptdist bench parallel [CONFIG]`: tokens/s of one tiny model in every parallel layout, under the real launcher.

Each layout is a short `launch/train.sh` run (the deepspeed launcher, GPUS_PER_NODE ranks, OMP threads = cores /
ranks so that no layout oversubscribes the cores more than another) of the same fixed model on the recipe's data,
with the same global batch (so the same tokens per optimizer step) in every layout. tokens/s is the median of the
per-step values in metrics.jsonl after the first steps (start-up, allocator and op warm-up).

Then, at dp=2 with one micro-batch per step (so that one step is one gradient reduction, as in the ZeRO paper),
ZeRO 1/2/3 runs with DeepSpeed's comms logger (profile.comms=true), whose per-rank records the run writes to
RUN_DIR/profile/ (telemetry/profiling.py), compared with the paper's volumes (comms.py). Pipeline layouts run with
profile.pipeline=true, which times every instruction of the schedule. gptdist's ZeRO-1/2 reduce each gradient slice
to its owner (use_multi_rank_bucket_allreduce off, ds_config.py); the "allreduce" layouts put DeepSpeed's own
default back (every bucket all-reduced) to keep the comparison in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from gptdist.bench.comms import comms_table, pipeline_table, throughput_table
from gptdist.config import load_config
from gptdist.errors import UserError
from gptdist.launchers.child import run_group
from gptdist.machine import usable_cores
from gptdist.model import count_parameters
from gptdist.telemetry.profiling import read_profiles

ROOT = Path(__file__).resolve().parents[2]

# The fixed tiny model: small enough that 8 ranks start and train on 2 cores in about a minute.
MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.seq_len=128"]
MICRO, GLOBAL = 4, 16  # 16 sequences per step in every layout: 4 micro-batches of 4 on one rank, 2 per rank at dp=2
ALLREDUCE = {"zero_optimization": {"use_multi_rank_bucket_allreduce": True}}  # DeepSpeed's default, not gptdist's


@dataclass
class Run:
    name: str
    ranks: int
    overrides: List[str]
    ds_json: Dict = field(default_factory=dict)
    global_batch: int = GLOBAL
    comms: bool = False  # the comms-logger variant: one micro-batch per rank per step

    def all_overrides(self, steps: int, run_dir: Path, ds_file: Optional[Path]) -> List[str]:
        extra = [f"train.micro_batch_size={MICRO}", f"train.global_batch_size={self.global_batch}",
                 f"train.steps={steps}", "train.log_every=1", "train.warmup_steps=0", "checkpoint.every=0",
                 "checkpoint.at_end=false", "tracking.enabled=false", "eval.every=0", "eval.at_end=false",
                 "resume=never", f"run.dir={run_dir}",
                 f"profile.comms={str(self.comms).lower()}", "profile.pipeline=true"]
        if ds_file is not None:
            extra.append(f"train.deepspeed_config={ds_file}")
        return MODEL + self.overrides + extra


def layouts() -> List[Run]:
    zero = lambda s: [f"parallel.zero_stage={s}"]  # noqa: E731
    return [
        Run("1 rank", 1, zero(0)),
        Run("dp2 zero1", 2, zero(1)),
        Run("dp2 zero1 allreduce", 2, zero(1), ALLREDUCE),
        Run("dp2 zero2", 2, zero(2)),
        Run("dp2 zero2 allreduce", 2, zero(2), ALLREDUCE),
        Run("dp2 zero3", 2, zero(3)),
        Run("tp2", 2, ["parallel.tp=2", *zero(0)]),
        Run("pp2", 2, ["parallel.pp=2", *zero(0)]),
        Run("tp2 pp2 dp2", 8, ["parallel.tp=2", "parallel.pp=2", *zero(1)]),
    ]


def comms_runs() -> List[Run]:
    out = []
    for stage, ds in ((1, {}), (1, ALLREDUCE), (2, {}), (2, ALLREDUCE), (3, {})):
        name = f"dp2 zero{stage}" + (" allreduce" if ds else "")
        out.append(Run(name, 2, [f"parallel.zero_stage={stage}"], ds, global_batch=2 * MICRO, comms=True))
    return out


@dataclass
class Outcome:
    run: Run
    tokens_per_s: Optional[float] = None
    threads: int = 1
    profile: Dict[int, Dict] = field(default_factory=dict)  # rank -> the run's RUN_DIR/profile/rank_<r>.json
    error: str = ""
    rates: List[float] = field(default_factory=list)  # each repeat's tokens/s; tokens_per_s is their median

    def merge(self, other: "Outcome") -> None:
        """Fold another repeat of the same layout in: the median over repeats, the newest profile records."""
        if other.tokens_per_s is not None:
            self.rates.append(other.tokens_per_s)
            self.tokens_per_s = statistics.median(self.rates)
            self.profile = other.profile or self.profile
        elif other.error:
            self.error = other.error if not self.rates else f"{other.error} (one repeat of several)"


def cores() -> int:
    return usable_cores()


def execute(run: Run, config: str, user_overrides: Sequence[str], steps: int, out_dir: Path, timeout: float,
            skip_steps: int = 2) -> Outcome:
    """One launch/train.sh run; tokens/s is the median per-step value after `skip_steps` steps."""
    run_dir = out_dir / run.name.replace(" ", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    ds_file = None
    if run.ds_json:
        ds_file = run_dir / "deepspeed.json"
        ds_file.write_text(json.dumps(run.ds_json))
    threads = max(1, cores() // run.ranks)
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(GPUS_PER_NODE=str(run.ranks), OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), config,
           *run.all_overrides(steps, run_dir, ds_file), *user_overrides]
    outcome = Outcome(run, threads=threads)
    log = run_dir / "log.txt"
    # Its own process group: a time-out stops the launcher and every rank it started, not only the shell.
    status = run_group(cmd, cwd=ROOT, env=env, log=log, timeout=timeout)
    if status is None:
        outcome.error = f"timed out after {timeout:.0f} s (log: {log})"
        return outcome
    outcome.profile = read_profiles(run_dir)
    metrics = run_dir / "metrics.jsonl"
    # A run that finished its steps counts even if the launcher's exit was unclean (gloo teardown, see notes).
    if not (run_dir / "run_complete.json").exists() or not metrics.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        outcome.error = f"exit {status}: {' / '.join(tail)[-300:]} (log: {log})"
        return outcome
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "tokens_per_s" in r]  # training steps, not validation records
    rates = [r["tokens_per_s"] for r in records if r["step"] > skip_steps] or [r["tokens_per_s"] for r in records]
    outcome.tokens_per_s = statistics.median(rates)
    return outcome


def run_bench_parallel(args: argparse.Namespace) -> int:
    if not (ROOT / "launch" / "train.sh").exists():
        raise UserError("bench parallel needs a source checkout of gptdist (it runs launch/train.sh)")
    if args.steps < 3 or args.repeats < 1:
        raise UserError("--steps must be at least 3 (the first steps are start-up), --repeats at least 1")
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)  # `bench parallel key=value ...`: no recipe given, only overrides
        args.config = None
    config = str(Path(args.config).resolve()) if args.config else str(ROOT / "configs" / "tiny-cpu.yaml")
    cfg = load_config(config, [*MODEL, *overrides])  # refuses bad overrides before any launch
    wanted = set(n.strip() for n in args.layouts.split(",")) if args.layouts else None
    runs = [r for r in layouts() if wanted is None or r.name in wanted]
    comms = [r for r in comms_runs() if not args.no_comms and (wanted is None or r.name in wanted)]
    if not runs and not comms:
        raise UserError(f"--layouts {args.layouts!r} names none of: {', '.join(r.name for r in layouts())}")

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gptdist-bench-parallel-"))
    results = [Outcome(run, threads=max(1, cores() // run.ranks)) for run in runs]
    comms_results = []
    try:
        # Rounds over all layouts, so that a busy spell on a shared machine hits every layout alike.
        for r in range(args.repeats):
            for run, merged in zip(runs, results):
                print(f"bench | round {r + 1}/{args.repeats}: {run.name}, {run.ranks} rank(s)", file=sys.stderr,
                      flush=True)
                merged.merge(execute(run, config, overrides, args.steps, out_dir, args.timeout))
        for run in comms:
            print(f"bench | comms {run.name}: {run.ranks} rank(s)", file=sys.stderr, flush=True)
            comms_results.append(execute(run, config, overrides, 4, out_dir, args.timeout))
    finally:
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)

    m = cfg.model
    params = count_parameters(m)
    print(f"gptdist bench parallel: {m.n_layer} layers, d_model {m.d_model}, vocab {m.vocab_size}, seq {m.seq_len}, "
          f"{params / 1e6:.2f} M params; {GLOBAL} sequences per step (micro-batch {MICRO}); {args.steps} steps, "
          f"median tokens/s after step 2, median of {args.repeats} interleaved run(s) per layout; {cores()} CPU cores, "
          f"OMP threads per rank = cores / ranks")
    print()
    print(throughput_table(results))
    if comms_results:
        print()
        print(comms_table(comms_results, params * 4, dp=2, steps=4, throughput=results))
    pipes = [o for o in results if o.profile and any(r.get("pipe_steps") for r in o.profile.values())]
    pp_runs = [o for o in results if "pp2" in o.run.name]
    if pp_runs:
        print()
        print(pipeline_table(pp_runs, pipes, micro=MICRO, global_batch=GLOBAL))
    failed = [o for o in results + comms_results if o.error]
    return 1 if failed else 0
