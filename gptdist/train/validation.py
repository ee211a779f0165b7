"""Validation during training: the mean next-token loss over eval.max_samples windows spread evenly over eval.data, in
every layout, equal to what `gptdist eval` reports for the checkpoint of the same step.

The windows are read by gptdist/data/held_out.py, as `gptdist eval` reads them. Window k goes to data-parallel rank
k mod D; each rank scores its windows in micro-batches of train.micro_batch_size. Every rank runs the same number of
forward passes (ZeRO-3 gathers parameters, and a pipeline passes activations, collectively), so a rank with fewer
windows pads its last micro-batches with a window whose targets are all ignored (-100): padding adds no tokens and
no loss. The loss of a micro-batch is its mean over counted tokens; weighted by their number, summed over
micro-batches, stages and replicas in float64, divided by the tokens: exactly the tool's mean.

    pp = 1   the engine's forward under no_grad, in eval mode (no dropout), tensor-parallel ranks alike
    pp > 1   DeepSpeed's inference schedule (PipelineEngine.eval_batch) over the same micro-batches; the last stage
             holds the per-micro-batch losses and shares the sum with its pipeline
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.distributed as dist

from gptdist.data.held_out import held_out_config, spread_windows

IGNORE = -100


class NoValidation:
    """eval.data unset (or neither eval.every nor eval.at_end): never due."""

    def due(self, step: int, last: bool) -> bool:
        return False


class Validator:
    def __init__(self, cfg, rank, tokenizer, log):
        """rank: the started engine.process.Rank; log: rank-0 messages, told what is validated and when."""
        ev, data = cfg.eval, cfg.data
        source = ev.source
        self.layout, self.topology, self.device = rank.layout, rank.topology, rank.device
        self.every, self.at_end, self.max_samples = ev.every, ev.at_end, ev.max_samples
        self.seq_len = cfg.model.seq_len
        held = held_out_config(source, data.tokenizer, source.text_field or data.text_field, data.text_split)
        windows = spread_windows(held, tokenizer, self.seq_len, ev.max_samples, key="eval.data")
        self.samples = len(windows)
        self.batches = self._micro_batches(windows)  # the same every time: built once
        log.info(f"gptdist | validation on {self.samples} windows spread over {source.path}"
                 f"{f' every {ev.every} steps' if ev.every else ''}{' and at the end' if ev.at_end else ''}")

    def due(self, step: int, last: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (last and self.at_end)

    def _micro_batches(self, windows: List[List[int]]) -> List[Tuple[torch.Tensor, torch.Tensor, int]]:
        """This replica's windows as (inputs, targets, counted tokens), padded to the same count on every rank."""
        dp, mb = self.layout.dp, self.layout.micro_batch_size
        per_rank = math.ceil(self.samples / dp)
        count = math.ceil(per_rank / mb)
        mine = windows[self.topology.dp_rank :: dp]
        rows = [(w, True) for w in mine] + [(windows[0], False)] * (count * mb - len(mine))
        out = []
        for i in range(count):
            chunk = rows[i * mb : (i + 1) * mb]
            w = torch.tensor([r for r, _ in chunk], dtype=torch.long)
            inputs, targets = w[:, :-1].clone(), w[:, 1:].clone()
            for j, (_, real) in enumerate(chunk):
                if not real:
                    targets[j] = IGNORE
            counted = sum(self.seq_len for _, real in chunk if real)
            out.append((inputs.to(self.device), targets.to(self.device), counted))
        return out

    @torch.no_grad()
    def run(self, engine) -> Tuple[float, int]:
        """Collective: every rank calls it. Returns (mean loss, windows scored), the same on every rank."""
        batches = self.batches
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss x tokens, tokens)
        if self.layout.pp == 1:
            engine.eval()
            try:
                for inputs, targets, counted in batches:
                    loss = engine(inputs, targets)
                    if counted:
                        total[0] += loss.double() * counted
                        total[1] += counted
            finally:
                engine.train()
        else:
            data = iter([(i, t) for i, t, _ in batches]) if self.topology.needs_data else None
            try:
                losses = engine.eval_batch(data, compute_loss=True, reduce_output=None, bcast_loss=False,
                                           num_micro_batches=len(batches))
            finally:
                engine.module.train()
            if self.topology.is_last_stage:
                for loss, (_, _, counted) in zip(losses, batches):
                    if counted:
                        total[0] += loss.double() * counted
                        total[1] += counted
            dist.all_reduce(total, group=self.topology.pp_group)  # the last stage's sums, to every stage
        if self.layout.dp > 1:
            dist.all_reduce(total, group=self.topology.dp_group)
        return float(total[0] / total[1]), self.samples

