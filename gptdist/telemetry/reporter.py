"""What rank 0 tells the user during training: a progress bar, metrics.jsonl, MLflow.

Losses stay on the device until a logging window closes; then one collective gives the data-parallel mean of
every step in the window, and one batch of records goes to metrics.jsonl and MLflow. Between windows the loop
never waits on the host.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from gptdist.telemetry.peak import mfu as model_flops_utilization


def progress_bar(is_main: bool, start: int, total: int):
    # In a log file (not a terminal) a bar redrawn every second would flood it: redraw every 30 s there.
    return tqdm(total=total, initial=start, disable=not is_main, unit="step", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)


class StepReporter:
    def __init__(self, *, tokens_per_step: int, samples_per_step: int, flops_per_token: float,
                 job_peak_flops: Optional[float], dp_group, dp_size: int, metrics, tracker, progress, warn=None,
                 peak_exceeded: Optional[Callable[[float], None]] = None):
        """peak_exceeded(achieved job FLOP/s): called once when the model's FLOP/s exceed job_peak_flops."""
        self.tokens_per_step, self.samples_per_step = tokens_per_step, samples_per_step
        self.peak_exceeded = peak_exceeded
        self.flops_per_token, self.job_peak_flops = flops_per_token, job_peak_flops
        self.warn = warn
        self.mfu_warned = False
        self.postfix: Dict[str, str] = {}  # what the progress bar shows after the step count
        self.dp_group, self.dp_size = dp_group, dp_size
        self.metrics, self.tracker, self.progress = metrics, tracker, progress
        self.pending: List[Dict[str, Any]] = []
        self.window_start = time.perf_counter()
        self.bad_steps = 0  # steps whose loss was NaN/inf: skipped by the optimizer
        self.consecutive_bad = 0

    def add(self, step: int, loss: torch.Tensor, lr: float, grad_norm: Optional[Any]) -> None:
        self.pending.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        self.progress.update(1)

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([p["loss"] for p in self.pending])
        if self.dp_group is not None and self.dp_size > 1:
            torch.distributed.all_reduce(losses, op=torch.distributed.ReduceOp.SUM, group=self.dp_group)
            losses = losses / self.dp_size
        values = losses.tolist()
        step_time = (time.perf_counter() - self.window_start) / len(self.pending)
        self.window_start = time.perf_counter()
        tokens_per_s = self.tokens_per_step / step_time
        mfu = model_flops_utilization(tokens_per_s, self.flops_per_token, self.job_peak_flops)
        if mfu is None and self.job_peak_flops and not self.mfu_warned and self.warn is not None:
            self.mfu_warned = True
            self.warn("MFU above 100 % against the measured peak: not shown (declare the peak with "
                      "train.peak_flops for an exact figure)")
            if self.peak_exceeded is not None:
                self.peak_exceeded(tokens_per_s * self.flops_per_token)
        records = []
        for item, loss in zip(self.pending, values):
            norm = item["grad_norm"]
            finite = math.isfinite(loss)
            self.bad_steps += not finite
            self.consecutive_bad = 0 if finite else self.consecutive_bad + 1
            norm = float(norm) if norm is not None else None
            records.append({
                # JSON has no NaN: a non-finite value is written as null, and `skipped` says what happened.
                "step": item["step"], "loss": loss if finite else None, "lr": item["lr"],
                "grad_norm": norm if norm is not None and math.isfinite(norm) else None,
                "skipped": not finite, "bad_steps": self.bad_steps,
                "tokens": item["step"] * self.tokens_per_step, "samples": item["step"] * self.samples_per_step,
                "tokens_per_s": tokens_per_s, "step_time_s": step_time, "mfu": mfu,
            })
        self.pending.clear()
        if self.metrics is not None:
            self.metrics.write(records)
            self.tracker.log_metrics(records)
            last = records[-1]
            shown = f"{last['loss']:.4f}" if last["loss"] is not None else "nan (skipped)"
            self.postfix.update(loss=shown, tok_s=f"{tokens_per_s:,.0f}")
            if mfu is not None:
                self.postfix["mfu"] = f"{mfu:.1%}"
            else:
                self.postfix.pop("mfu", None)  # an earlier window's figure would stand for this one
            self.progress.set_postfix(refresh=False, **self.postfix)

    def add_validation(self, step: int, loss: float, samples: int) -> None:
        """A validation record of its own in metrics.jsonl ({step, val_loss, val_ppl, val_samples}), after the
        step records before it; val_loss and val_ppl in MLflow; the last value on the progress bar."""
        self.flush()
        self.window_start = time.perf_counter()  # the validation's time is not the training steps' time
        if self.metrics is None:
            return
        ppl = math.exp(loss) if loss < 700 else None
        record = {"step": step, "val_loss": loss, "val_ppl": ppl, "val_samples": samples}
        self.metrics.write([record])
        self.tracker.log_metrics([record])
        self.postfix["val_loss"] = f"{loss:.4f}"
        self.progress.set_postfix(refresh=False, **self.postfix)

    def close(self) -> None:
        self.flush()
        self.progress.close()
