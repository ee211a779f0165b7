"""One optimizer step, as the loop sees it: the learning rate it uses, the step itself, the gradient norm, the drills.

The loss stays on the device (the telemetry syncs once per logging window, not every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's loss of the step, on the device
    lr: float  # the rate the step used
    grad_norm: Optional[Any]  # the global gradient norm (a tensor or float; None where DeepSpeed keeps none)


class Stepper:
    """engine: the DeepSpeed engine; step_fn: engine.steps.PlainStep or PipelineStep; batches: this rank's batches
    (None on pipeline stages that read no data); drills: train.drills.FaultDrills."""

    def __init__(self, engine, step_fn, batches: Optional[Iterator], drills) -> None:
        self.engine, self.step_fn, self.batches, self.drills = engine, step_fn, batches, drills

    @property
    def needs_dp_mean(self) -> bool:
        """Whether the loss is this rank's alone (pp = 1) and the telemetry must average it over data parallelism."""
        return self.step_fn.needs_dp_mean

    def step(self, step: int) -> StepResult:
        """Optimizer step number `step` (1-based)."""
        lr = self.engine.get_lr()[0]  # the scheduler advances inside the step
        loss = self.step_fn(self.batches, step)
        result = StepResult(loss, lr, self.engine.get_global_grad_norm())
        self.drills.kill_if_due("kill", step)
        return result
