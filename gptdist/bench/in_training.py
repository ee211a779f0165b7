"""The `bench train` row that is a real training run: `gptdist train CONFIG` in a process of its own, with the
recipe's default settings (data loader, validation, memory report, MLflow tracking, checkpoints), so the table can
never hide what a user's run costs around the model step.

Its tokens/s is what the user reads: the median of metrics.jsonl's logging windows after step 10, validation and
saves excluded as they are from every window. Its breakdown (telemetry/step_times.py) says where each step's time
went. Work per optimizer step equals the other rows': one micro-batch, one rank.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from gptdist.telemetry.step_times import PARTS

ROW = "in-training"
TITLE = "gptdist train (metrics.jsonl)"
FIRST_STEP = 10  # windows ending after this step count; the first steps build caches and thread pools


def training_overrides(micro_batch: int, steps: int, run_dir: Path) -> List[str]:
    """One rank, one micro-batch per step (the other rows' work per step); everything else the recipe's defaults."""
    return ["parallel.tp=1", "parallel.pp=1", f"train.global_batch_size={micro_batch}", f"train.steps={steps}",
            f"run.dir={run_dir}", "resume=never"]


def run_training(config: str, overrides: Sequence[str], micro_batch: int, steps: int, run_dir: Path,
                 timeout_s: float = 1800) -> Dict[str, Any]:
    """One `gptdist train` run; returns {"windows": [(steps, seconds)...], "times": step_times.json} or raises."""
    cmd = [sys.executable, "-m", "gptdist.cli", "train", config, *overrides,
           *training_overrides(micro_batch, steps, run_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout_s, start_new_session=True)
    if done.returncode != 0:
        raise RuntimeError(f"gptdist train exited {done.returncode}:\n{done.stdout[-3000:]}")
    return {"windows": step_windows(run_dir / "metrics.jsonl"), "times": read_times(run_dir),
            "peak_rss_bytes": _peak_rss(run_dir)}


def step_windows(metrics: Path) -> List[float]:
    """tokens/s of each logging window that ends after FIRST_STEP (one value per window, as metrics.jsonl repeats
    the window's rate on each of its steps)."""
    rates: Dict[int, float] = {}
    last_rate, window_end = None, None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "tokens_per_s" not in record:
            continue
        if record["tokens_per_s"] != last_rate and window_end is not None:
            rates[window_end] = last_rate
        last_rate, window_end = record["tokens_per_s"], record["step"]
    if window_end is not None:
        rates[window_end] = last_rate
    return [rate for end, rate in sorted(rates.items()) if end > FIRST_STEP]


def _peak_rss(run_dir: Path) -> int:
    path = run_dir / "memory" / "rank_0.json"
    return int(json.loads(path.read_text()).get("peak_rss_bytes") or 0) if path.is_file() else 0


def read_times(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / "step_times.json"
    return json.loads(path.read_text()) if path.is_file() else None


def breakdown(all_times: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Median ms per step of each part over the runs."""
    return {part: statistics.median(t["ms_per_step"][part] for t in all_times) for part in PARTS}


def format_breakdown(parts: Dict[str, float]) -> str:
    every = sum(v for p, v in parts.items() if p not in ("validation", "checkpoint"))
    out = ["| part of a step | ms per step | share of every step |", "|---|---:|---:|"]
    for part in PARTS:
        share = f"{parts[part] / every:.2%}" if every and part not in ("validation", "checkpoint") else "scheduled"
        out.append(f"| {part} | {parts[part]:,.2f} | {share} |")
    around = 1 - parts["model"] / every if every else 0.0
    out.append(f"| around the model (data, telemetry, stop, other) | {every - parts['model']:,.2f} | {around:.2%} |")
    return "\n".join(out)
