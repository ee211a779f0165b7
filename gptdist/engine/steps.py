"""One optimizer step on each kind of DeepSpeed engine.

The plain engine (pp = 1) is driven micro-batch by micro-batch; the pipeline engine runs its whole 1F1B
schedule inside `train_batch`. Both return the step's loss as a tensor, without a host sync.
"""

from __future__ import annotations

from typing import Iterator

import torch


class PlainStep:
    """pp = 1: forward/backward per micro-batch; DeepSpeed accumulates and steps at the boundary.

    The returned loss is this rank's mean over its micro-batches; the data-parallel mean is taken later, once
    per logging window (`needs_dp_mean`)."""

    needs_dp_mean = True

    def __init__(self, engine, grad_accum: int, drills=None):
        self.engine, self.grad_accum, self.drills = engine, grad_accum, drills

    def __call__(self, batches: Iterator, step: int) -> torch.Tensor:
        total = torch.zeros((), device=self.engine.device)
        for _ in range(self.grad_accum):
            inputs, targets = next(batches)
            loss = self.engine(inputs, targets)
            if self.drills is not None and self.drills.due("nan-loss", step):
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
