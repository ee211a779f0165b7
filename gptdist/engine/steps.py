"""One optimizer step on each kind of DeepSpeed engine.

The plain engine (pp = 1) is driven micro-batch by micro-batch; the pipeline engine runs its whole 1F1B
schedule inside `train_batch`. Both return the step's loss as a tensor, without a host sync.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator

import torch


class DataPosition:
    """The loader state after the newest micro-batch this rank consumed (what a checkpoint must resume from)."""

    def __init__(self, state: Dict[str, Any]) -> None:
        self.state = state

    def track(self, batches: Iterator, device: torch.device) -> Iterator:
        for batch in batches:
            self.state = batch.state
            yield batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)


class PlainStep:
    """pp = 1: forward/backward per micro-batch; DeepSpeed accumulates and steps at the boundary.

    The returned loss is this rank's mean over its micro-batches; the data-parallel mean is taken later, once
    per logging window (`needs_dp_mean`)."""

    needs_dp_mean = True

    def __init__(self, engine, grad_accum: int, faults=None):
        self.engine, self.grad_accum, self.faults = engine, grad_accum, faults

    def __call__(self, batches: Iterator, step: int) -> torch.Tensor:
        total = torch.zeros((), device=self.engine.device)
        for _ in range(self.grad_accum):
            inputs, targets = next(batches)
            loss = self.engine(inputs, targets)
            if self.faults is not None and self.faults.due("nan-loss", step):
                loss = loss * float("nan")  # a drill: what an overflow or a poisoned batch does to the step
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return total / self.grad_accum


class PipelineStep:
    """pp > 1: DeepSpeed's PipelineEngine runs grad_accum micro-batches through the stages (1F1B) and returns
    the loss already averaged over micro-batches and data-parallel replicas, on every stage."""

    needs_dp_mean = False

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, batches: Iterator | None, step: int) -> torch.Tensor:
        return self.engine.train_batch(data_iter=batches).detach().float()
