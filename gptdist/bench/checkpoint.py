"""`gptdist bench checkpoint [CONFIG]`: what a checkpoint costs, with checkpoint.async on and off, in one run.

Two short `launch/train.sh` runs of the same ~60 M-parameter model (by default) on 2 CPU ranks with ZeRO-1, saving
every few steps, one with the background writer and one without; repeated and interleaved. From each run's
metrics.jsonl: the seconds a save blocked training (the longest rank's), the seconds its write took, the bytes every
rank wrote, and the step time of the steps that saved against those that did not. The bytes per parameter count
everything in the checkpoint folder (weights, two Adam moments, random states, index, state, manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from gptdist.config import load_config
from gptdist.errors import UserError
from gptdist.launchers.child import run_group
from gptdist.machine import usable_cores
from gptdist.model import count_parameters

ROOT = Path(__file__).resolve().parents[2]
# About 60 M parameters: 8 blocks of width 768 (56.6 M) and the recipe's 4096-token vocabulary (3.1 M).
MODEL = ["model.n_layer=8", "model.n_head=12", "model.d_model=768", "model.seq_len=256"]


def _run(config: str, overrides: List[str], mode: bool, args, out: Path, index: int) -> Dict:
    run_dir = out / f"{'async' if mode else 'sync'}-{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, GPUS_PER_NODE=str(args.ranks), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(max(1, usable_cores() // args.ranks)))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), config, *MODEL, *overrides,
           f"checkpoint.async={str(mode).lower()}", f"checkpoint.every={args.every}", "checkpoint.keep=1",
           f"train.steps={args.steps}", "train.log_every=1", "train.micro_batch_size=1",
           f"train.global_batch_size={args.ranks}", "parallel.zero_stage=1", "tracking.enabled=false",
           "eval.every=0", "eval.at_end=false", "resume=never", f"run.dir={run_dir}"]
    status = run_group(cmd, cwd=ROOT, env=env, log=run_dir / "log.txt", timeout=args.timeout)
    if status is None or not (run_dir / "run_complete.json").exists():
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        raise UserError(f"bench checkpoint: the {'async' if mode else 'sync'} run failed ({' / '.join(tail)[-300:]})")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # The last save completes after training has ended, where nothing waits on it: the saves during training count.
    saves = [r for r in records if "checkpoint_blocking_s" in r and r["checkpoint_saved"] and r["step"] < args.steps]
    steps = {r["step"]: r["step_time_s"] for r in records if "step_time_s" in r}
    folder = run_dir / "checkpoints" / f"step_{args.steps:08d}"
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"saves": saves, "steps": steps, "bytes": on_disk}


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def run_bench_checkpoint(args: argparse.Namespace) -> int:
    if args.steps < 2 * args.every or args.every < 1 or args.repeats < 1 or args.ranks < 1:
        raise UserError("--every must be at least 1, --steps at least twice --every, --repeats and --ranks at least 1")
    config = str(Path(args.config).resolve())
    cfg = load_config(config, [*MODEL, *args.overrides])
    params = count_parameters(cfg.model)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gptdist-bench-checkpoint-"))
    results: Dict[bool, List[Dict]] = {True: [], False: []}
    try:
        for r in range(args.repeats):
            for mode in ((True, False) if r % 2 == 0 else (False, True)):
                print(f"bench | round {r + 1}/{args.repeats}: checkpoint.async={str(mode).lower()}", file=sys.stderr,
                      flush=True)
                results[mode].append(_run(config, list(args.overrides), mode, args, out, r))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(f"gptdist bench checkpoint: {params / 1e6:.1f} M parameters, {args.ranks} rank(s) ZeRO-1, a save every "
          f"{args.every} steps of {args.steps}, {args.repeats} interleaved run(s) per mode; {usable_cores()} cores")
    print()
    print("| checkpoint.async | training blocked per save s | of which the seal s | write per save s "
          "| step after a save s | other steps s | bytes on disk | bytes/parameter |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    blocked = {}
    for mode in (True, False):
        runs = results[mode]
        saves = [s for run in runs for s in run["saves"]]
        blocked[mode] = _median([s["checkpoint_blocking_s"] for s in saves])
        seal = _median([s.get("checkpoint_seal_s", 0.0) for s in saves])
        write = _median([s["checkpoint_write_s"] for s in saves])
        # A save happens after its step's time is taken: it lands in the next step's time.
        after_save = {s["step"] + 1 for s in saves}
        with_save = _median([t for run in runs for step, t in run["steps"].items() if step in after_save])
        without = _median([t for run in runs for step, t in run["steps"].items() if step not in after_save
                           and step > 2])
        on_disk = _median([run["bytes"] for run in runs])
        print(f"| {str(mode).lower()} | {blocked[mode]:.3f} | {seal:.3f} | {write:.3f} | {with_save:.3f} | "
              f"{without:.3f} | {on_disk / 1e6:.1f} MB | {on_disk / params:.2f} |")
    if blocked[True] is not None and blocked[False]:
        share = blocked[True] / blocked[False]
        print(f"\nasync blocks training for {share:.0%} of the synchronous save's time "
              f"({'within' if share <= 0.2 else 'over'} the aim of 20 %)")
    return 0
