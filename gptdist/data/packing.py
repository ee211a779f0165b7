"""Packing the token stream into samples, sharding samples over data-parallel ranks, and the resumable state.

Sample k is the window stream[k*(L+1) : (k+1)*(L+1)] (L = seq_len): inputs = window[:-1], targets = window[1:].
Windows do not overlap, so concatenating them gives back the token stream exactly.

Rank r of D, starting from sample s0, takes samples s0 + r, s0 + r + D, ...: row i is samples
[s0 + i*D, s0 + (i+1)*D) and a micro-batch of b rows leaves every rank at the same next sample. The state after
a micro-batch names that sample plus where its first token lies (block, offset inside the block's tokens, source
cursors at the block's start). It has no D in it: a loader with any D' started from it continues with exactly the
next unseen sample, and reads (without tokenizing) only up to the start of that block.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gptdist.data.blocks import Cursor, DataPlan, TokBlock
from gptdist.errors import UserError

log = logging.getLogger("gptdist.data")
STATE_VERSION = 1


@dataclass
class Batch:
    inputs: torch.Tensor  # (micro_batch_size, seq_len) int64
    targets: torch.Tensor  # (micro_batch_size, seq_len) int64: inputs shifted by one
    indices: List[int]  # global sample indices, one per row
    state: Dict[str, Any]  # JSON-serializable position right after the rows this batch covers


@dataclass
class Start:
    sample: int = 0
    block: int = 0
    offset: int = 0
    cursors: Optional[List[Cursor]] = None


class Packer:
    """Windows over a stream of tokenized blocks, pulled lazily; requests must not go backwards."""

    def __init__(
        self,
        blocks: Iterator[TokBlock],
        seq_len: int,
        start: Start,
        on_block: Optional[Callable[[TokBlock], None]] = None,
    ) -> None:
        self._blocks = blocks
        self.width = seq_len + 1
        # Absolute token positions: the first block read starts `offset` tokens before the start sample.
        self._end = start.sample * self.width - start.offset
        self._buf: Deque[Tuple[int, TokBlock]] = collections.deque()
        self._on_block = on_block

    def window(self, k: int) -> np.ndarray:
        pos = k * self.width
        self._fill(pos + self.width)
        self._drop(pos)
        pieces, want = [], pos + self.width
        for start, block in self._buf:
            lo, hi = max(pos, start), min(want, start + len(block.tokens))
            if lo < hi:
                pieces.append(block.tokens[lo - start : hi - start])
            if start + len(block.tokens) >= want:
                break
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def locate(self, k: int) -> Tuple[int, int, List[Cursor]]:
        """(block, offset in its tokens, source cursors at its start) of sample k's first token."""
        pos = k * self.width
        self._fill(pos + 1)
        self._drop(pos)
        start, block = self._buf[0]
        return block.index, pos - start, block.cursors

    def _fill(self, end: int) -> None:
        while self._end < end:
            block = next(self._blocks)
            self._buf.append((self._end, block))
            self._end += len(block.tokens)
            if self._on_block is not None:
                self._on_block(block)

    def _drop(self, pos: int) -> None:
        while self._buf and self._buf[0][0] + len(self._buf[0][1].tokens) <= pos:
            self._buf.popleft()


def rank_batches(
    packer: Packer, start: int, rank: int, world: int, micro_batch_size: int, state_of: Callable[..., Dict[str, Any]]
) -> Iterator[Batch]:
    row = 0
    while True:
        indices = [start + (row + i) * world + rank for i in range(micro_batch_size)]
        windows = np.stack([packer.window(k) for k in indices]).astype(np.int64)
        row += micro_batch_size
        after = start + row * world
        block, offset, cursors = packer.locate(after)
        # Two separate tensors, not overlapping views: a trainer may mask targets in place.
        inputs = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        targets = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        yield Batch(inputs, targets, indices, state_of(after, block, offset, cursors))


def make_state(plan: DataPlan, seq_len: int, sample: int, block: int, offset: int,
               cursors: Sequence[Cursor]) -> Dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "sample": int(sample),
        "block": int(block),
        "offset": int(offset),
        "sources": [[int(x) for x in c] for c in cursors],
        "files": [s.n_units for s in plan.sources],
        "seq_len": int(seq_len),
        "seed": int(plan.seed),
        "digest": plan.digest,
    }


def parse_state(state: Optional[Dict[str, Any]], plan: DataPlan, seq_len: int) -> Start:
    """The start position a saved state stands for, after checking it fits this config."""
    if not state:  # None, or {} from a run that saved before its first micro-batch: the very beginning
        return Start(cursors=plan.initial_cursors())
    try:
        version, sample, block, offset = (int(state[k]) for k in ("version", "sample", "block", "offset"))
        cursors = [[int(x) for x in c] for c in state["sources"]]
    except (KeyError, TypeError, ValueError):
        raise UserError("the checkpoint's data state is not one gptdist wrote (missing "
                        "sample/block/offset/sources)") from None
    if version != STATE_VERSION:
        raise UserError(f"the checkpoint's data state has version {version}; this gptdist reads version "
                        f"{STATE_VERSION}")
    if int(state.get("seq_len", seq_len)) != seq_len:
        raise UserError(
            f"the checkpoint's data position was saved with model.seq_len={state['seq_len']}, the config has "
            f"{seq_len}: sample indices would mean other tokens; resume with model.seq_len={state['seq_len']}"
        )
    if int(state.get("seed", plan.seed)) != plan.seed:
        raise UserError(
            f"the checkpoint's data position was saved with train.seed={state['seed']}, the config has {plan.seed}: "
            f"the data order would differ; resume with train.seed={state['seed']}"
        )
    if state.get("digest", plan.digest) != plan.digest or len(cursors) != len(plan.sources):
        raise UserError(
            "the data section (sources, weights, revisions, text_field, text_split, tokenizer or shuffle_buffer) "
            "changed since the checkpoint, so its saved data position does not apply; restore the data section of "
            "that run"
        )
    files = state.get("files") or [s.n_units for s in plan.sources]
    for i, (src, n) in enumerate(zip(plan.sources, files)):
        if int(n) != src.n_units:
            # Files added or removed under a folder/glob: positions inside the epoch no longer name the same files.
            log.warning(
                "%s now has %d file(s), the checkpoint saw %d: restarting its epoch %d from the first file",
                src.describe(), src.n_units, n, cursors[i][0],
            )
            cursors[i] = [cursors[i][0], 0, 0]
    return Start(sample, block, offset, cursors)
