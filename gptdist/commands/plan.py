"""`gptdist plan CONFIG [key=value ...] --gpus N ...`: predict the memory and step time of every layout of a recipe
on N devices, and recommend one; `--measure` runs the best candidates here and prints predicted against measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List

from gptdist.errors import UserError


def register_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="predict memory and step time of every layout on N devices; recommend one",
        description="Enumerate every valid (tp, pp, dp, ZeRO stage, micro-batch, activation checkpointing) for the "
                    "recipe on --gpus devices, predict per-rank memory and step time from the shapes alone, and "
                    "recommend the fastest layout that fits. Nothing is launched unless --measure is given.")
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gpus", type=int, required=True, help="devices (ranks) the run will have")
    p.add_argument("--gpus-per-node", type=int, default=None, help="devices per node (default: min(--gpus, 8))")
    p.add_argument("--hardware", default="h100",
                   help="preset: h100, h200, a100-80gb, a100-40gb, or cpu (this machine, measured) (default h100)")
    p.add_argument("--gpu-memory", default=None, help="memory per device, e.g. 80GiB (default: the preset's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device in the training precision")
    p.add_argument("--intra-node-gbps", type=float, default=None, help="collective bandwidth inside a node, GB/s")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="collective bandwidth across nodes, GB/s")
    p.add_argument("--headroom", type=float, default=0.1, help="memory kept free on each device (default 0.1)")
    p.add_argument("--top", type=int, default=15, help="table rows (default 15; --json lists all)")
    p.add_argument("--json", action="store_true", help="print one JSON list, one object per layout")
    p.add_argument("--measure", action="store_true",
                   help="run the best fitting layouts on this machine for a few steps; print predicted vs measured")
    p.add_argument("--measure-count", type=int, default=3, help="layouts --measure runs (default 3)")
    p.add_argument("--measure-steps", type=int, default=4, help="steps per measured run (default 4)")
    p.add_argument("--out", default=None, help="keep --measure's run directories here")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.config import load_config
    from gptdist.plan.hardware import resolve
    from gptdist.plan.search import search
    from gptdist.plan.table import plan_table

    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: must be at least 1")
    per_node = args.gpus_per_node or min(args.gpus, 8)
    if per_node < 1 or args.gpus % per_node and args.gpus > per_node:
        raise UserError(f"--gpus-per-node {per_node}: --gpus {args.gpus} must be a multiple of it")
    if not 0 <= args.headroom < 1:
        raise UserError(f"--headroom {args.headroom}: must be in [0, 1)")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the planner only uses DeepSpeed's partitioning arithmetic
    cfg = load_config(args.config, args.overrides)
    global_batch = cfg.train.global_batch_size or cfg.train.micro_batch_size * max(
        1, args.gpus // (cfg.parallel.tp * cfg.parallel.pp))
    hw = resolve(args.hardware, per_node, memory=args.gpu_memory, peak_tflops=args.peak_tflops,
                 intra=args.intra_node_gbps, inter=args.inter_node_gbps)
    plans = search(cfg.model, args.gpus, global_batch, hw, per_node, args.headroom)
    if not plans:
        raise UserError(f"no valid layout of {args.config} on {args.gpus} device(s): check model.n_head, "
                        "model.vocab_size and train.global_batch_size against the device count")
    if args.json and not args.measure:
        print(json.dumps([p.to_json() for p in plans], indent=1))
        return 0
    print(plan_table(cfg, args, hw, per_node, global_batch, plans))
    if args.measure:
        return _measure(cfg, args, plans, hw)
    return 0


def _measure(cfg, args, plans, hw) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.plan.measure import run_layout
    from gptdist.plan.table import measured_table

    if hw.device != "cpu":
        # torch: only to ask for a GPU
        import torch

        if not torch.cuda.is_available():
            raise UserError("--measure runs the layouts on this machine, which has no GPU: use --hardware cpu "
                            "to plan and measure for this CPU")
    chosen = [p for p in plans if p.fits][: args.measure_count]
    if not chosen:
        raise UserError("--measure: no layout fits, nothing to run")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gptdist-plan-"))
    results = []
    try:
        for plan in chosen:
            lay = plan.layout
            name = f"tp{lay.tp}-pp{lay.pp}-dp{lay.dp}-zero{lay.zero_stage}-mb{lay.micro_batch_size}" + (
                "-ac" if lay.activation_checkpointing else "")
            print(f"plan | measuring {name} for {args.measure_steps} steps", file=sys.stderr, flush=True)
            overrides = [*args.overrides, *layout_overrides(lay, plan.tokens_per_step // cfg.model.seq_len),
                         f"train.steps={args.measure_steps}", "train.log_every=1", "checkpoint.every=0",
                         "checkpoint.at_end=false", "tracking.enabled=false", "eval.every=0", "eval.at_end=false",
                         "resume=never"]
            # launch/train.sh shares the cores between CPU ranks itself (OMP threads = cores / ranks).
            results.append((plan, run_layout(str(Path(args.config).resolve()), overrides, lay.world_size, out / name)))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print()
    print(measured_table(results))
    if args.json:
        print(json.dumps([_measured_json(p, m) for p, m in results], indent=1))
    return 1 if any(not m.ok for _, m in results) else 0


def layout_overrides(lay, global_batch: int) -> List[str]:
    return [f"parallel.tp={lay.tp}", f"parallel.pp={lay.pp}", f"parallel.zero_stage={lay.zero_stage}",
            f"parallel.activation_checkpointing={str(lay.activation_checkpointing).lower()}",
            f"train.micro_batch_size={lay.micro_batch_size}", f"train.global_batch_size={global_batch}"]


def _measured_json(plan, m) -> dict:
    out = plan.to_json()
    reports = m.reports.values()
    out["measured"] = {
        "ok": m.ok, "error": m.error,
        "model_state_bytes": max((r.get("model_state_bytes") or 0 for r in reports), default=None),
        "peak_bytes": max((r.get("peak_live_bytes") or 0 for r in reports), default=None),
        "peak_rss_bytes": max(m.vm_hwm.values(), default=None),
        "step_time_s": m.step_time(),
    }
    return out
