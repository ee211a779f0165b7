"""`gptdist compare-loss RUN_A RUN_B`: do two runs' losses agree step by step?

Used to prove that a parallel layout trains the same model as one rank, and that a resumed run continues as if
never stopped. Reads each run's metrics.jsonl (a run directory or the file itself).
"""

from __future__ import annotations

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


Row = Tuple[int, float, float, float]  # (step, loss A, loss B, relative difference)


def compare(a: Dict[int, float], b: Dict[int, float], rtol: float) -> Tuple[List[Row], bool]:
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
