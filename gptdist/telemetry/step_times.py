"""Where a training step's time goes: the loop's parts timed on rank 0's clock, summed after the warm-up.

Parts: data (waiting for this rank's next batches), model (forward, backward, optimizer step), telemetry (the step's
record, the logging window's one sync and collective, metrics.jsonl, MLflow, the memory report), validation,
checkpoint (a save's share of the step; the write itself runs in the background), stop (the ranks' agreement on a
stop signal) and other (the loop itself). On a GPU the step is asynchronous, so the model's time lands where the host
next waits for the device (the telemetry's sync once per window): read the sum there, the split on CPUs.

Written to RUN_DIR/step_times.json at the end and printed as one line; `gptdist bench train` reads it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional

PARTS = ("data", "model", "telemetry", "validation", "checkpoint", "stop", "other")
WARMUP_STEPS = 10  # the first steps build caches and thread pools: steady state starts after them


class StepTimes:
    """laps of the loop's parts; `data_seconds()` is the feed's running total of time spent waiting for batches."""

    def __init__(self, data_seconds: Callable[[], float], start_step: int) -> None:
        self.data_seconds = data_seconds
        self.first_counted = start_step + WARMUP_STEPS + 1
        self.seconds: Dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.steps = 0
        self._counting = False
        self._mark = 0.0
        self._data_mark = 0.0

    def begin(self, step: int) -> None:
        """At the top of the loop for optimizer step `step`; the loop's own time since the last lap is `other`."""
        now = time.perf_counter()
        if self._counting:
            self.seconds["other"] += now - self._mark
        self._counting = step >= self.first_counted
        self.steps += self._counting
        self._mark, self._data_mark = now, self.data_seconds()

    def lap(self, part: str) -> None:
        """`part` ends now. The model's lap includes fetching the batches; their share is moved to `data`."""
        now = time.perf_counter()
        if self._counting:
            spent = now - self._mark
            if part == "model":
                data = self.data_seconds() - self._data_mark
                self.seconds["data"] += data
                spent -= data
            self.seconds[part] += spent
        self._mark = now

    def summary(self) -> Optional[Dict[str, object]]:
        """ms per step of each part and its share of the step, over the counted steps (None if there were none)."""
        if not self.steps:
            return None
        total = sum(self.seconds.values())
        # What every step pays, against what the user schedules (validation, checkpoints every N steps).
        every_step = total - self.seconds["validation"] - self.seconds["checkpoint"]
        return {"steps": self.steps, "after_step": self.first_counted - 1,
                "ms_per_step": {p: 1000 * s / self.steps for p, s in self.seconds.items()},
                "share": {p: (s / total if total else 0.0) for p, s in self.seconds.items()},
                "around_the_model": 1 - self.seconds["model"] / every_step if every_step else 0.0,
                "scheduled": (total - every_step) / total if total else 0.0}

    def write(self, run_dir: Path) -> Optional[Dict[str, object]]:
        found = self.summary()
        if found is None:
            return None
        path = run_dir / "step_times.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(found, indent=1))
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk: leave no torn file behind
            raise
        return found


def describe(found: Dict[str, object]) -> str:
    per = found["ms_per_step"]
    parts = ", ".join(f"{p} {per[p]:.2f}" for p in PARTS if per[p] >= 0.005 or p in ("data", "model"))
    return (f"time per step after step {found['after_step']} (ms): {parts}; "
            f"{100 * found['around_the_model']:.1f} % of each step around the model, "
            f"{100 * found['scheduled']:.1f} % of the time in validation and checkpoints")
