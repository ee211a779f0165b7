"""`gptdist compare-loss RUN_A RUN_B`: do two runs' losses agree step by step?

Used to prove that a parallel layout trains the same model as one rank, and that a resumed run continues as if
never stopped. Reads each run's metrics.jsonl (a run directory or the file itself).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, List, Tuple

from gptdist.errors import UserError
from gptdist.telemetry.metrics_file import read_metrics


def load_losses(run: str | Path) -> Dict[int, float]:
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"compare-loss: {path} not found: pass a run directory holding metrics.jsonl, or the file")
    losses: Dict[int, float] = {}
    for record in read_metrics(path):
        if "loss" not in record:  # a validation record ({step, val_loss, ...}), not a training step
            continue
        loss = record.get("loss")
        losses[int(record["step"])] = float(loss) if loss is not None else math.nan  # null: a skipped step
    return losses


def compare(a: Dict[int, float], b: Dict[int, float], rtol: float) -> Tuple[List[Tuple[int, float, float, float]], bool]:
    """Rows of (step, loss_a, loss_b, relative difference) over the common steps, and whether all are within rtol."""
    rows = []
    ok = True
    for step in sorted(set(a) & set(b)):
        x, y = a[step], b[step]
        rel = abs(x - y) / max(abs(x), abs(y), 1e-30)
        if not (math.isfinite(x) and math.isfinite(y)) or rel > rtol:
            ok = False
        rows.append((step, x, y, rel))
    return rows, ok


def register_compare_command(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("compare-loss", help="compare two runs' per-step losses",
                         description="Exit 0 if every common step's losses agree within --rtol, else 1.")
    cmd.add_argument("run_a")
    cmd.add_argument("run_b")
    cmd.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance per step (default 1e-4)")
    cmd.add_argument("--steps", type=str, default=None, help="only steps FIRST:LAST (inclusive)")
    cmd.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    a, b = load_losses(args.run_a), load_losses(args.run_b)
    if args.steps:
        first, _, last = args.steps.partition(":")
        keep = range(int(first or 0), int(last or 10**12) + 1)
        a = {s: v for s, v in a.items() if s in keep}
        b = {s: v for s, v in b.items() if s in keep}
    rows, ok = compare(a, b, args.rtol)
    if not rows:
        print("compare-loss: the runs have no step in common")
        return 1
    missing = sorted(set(a) ^ set(b))
    print(f"{'step':>6} {'loss A':>14} {'loss B':>14} {'rel diff':>10}")
    for step, x, y, rel in rows:
        flag = "" if rel <= args.rtol else "  <-- over rtol"
        print(f"{step:>6} {x:>14.8f} {y:>14.8f} {rel:>10.2e}{flag}")
    worst = max(rel for *_, rel in rows)
    if missing:
        print(f"steps in only one run: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    verdict = "MATCH" if ok and not missing else "MISMATCH"
    print(f"{verdict}: {len(rows)} common steps, max relative difference {worst:.2e} (rtol {args.rtol:g})")
    return 0 if verdict == "MATCH" else 1
