"""Packing the token stream into samples, sharding samples over data-parallel ranks, and the resumable state.

Physical window p is stream[p*(L+1) : (p+1)*(L+1)] (L = seq_len): inputs = window[:-1], targets = window[1:].
Windows do not overlap. Without window shuffling (data.window_shuffle 0 or 1) sample k is physical window k, so
concatenating the samples gives back the token stream exactly. With a span of W windows, the samples of span
s = k // W are the physical windows of that span in the order of a permutation seeded by (seed, s): a batch holds
windows from across the span, not neighbours in the text. The permutation comes before the assignment to ranks,
so the global sample sequence is the same for any number of ranks. A rank packs a span whole when it enters it
(W x (L+1) int32 tokens held), so ranks that share the tokenizing read the stream in step.

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
_WINDOWS = 0x57494E44  # first word of the window-permutation seed, distinct from blocks.py's


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
    at: Optional[int] = None  # the physical window whose first token block/offset name (default: sample)


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
        at = start.sample if start.at is None else start.at
        self._end = at * self.width - start.offset
        self._buf: Deque[Tuple[int, TokBlock]] = collections.deque()
        self._on_block = on_block

    def window(self, k: int) -> np.ndarray:
        pieces = self._pieces(k * self.width, (k + 1) * self.width)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, lo: int, hi: int) -> np.ndarray:
        """Physical windows [lo, hi) as one (hi - lo, seq_len + 1) array, read up to window hi at once."""
        return np.concatenate(self._pieces(lo * self.width, hi * self.width)).reshape(hi - lo, self.width)

    def _pieces(self, pos: int, want: int) -> List[np.ndarray]:
        """The stream's tokens [pos, want) as views into the buffered blocks, packed up to `want` first."""
        self._fill(want)
        self._drop(pos)
        pieces = []
        for start, block in self._buf:
            lo, hi = max(pos, start), min(want, start + len(block.tokens))
            if lo < hi:
                pieces.append(block.tokens[lo - start : hi - start])
            if start + len(block.tokens) >= want:
                break
        return pieces

    def locate(self, k: int) -> Tuple[int, int, List[Cursor], int]:
        """(block, offset in its tokens, source cursors at its start, k) of physical window k's first token."""
        pos = k * self.width
        self._fill(pos + 1)
        self._drop(pos)
        start, block = self._buf[0]
        return block.index, pos - start, block.cursors, k

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


class SpanShuffle:
    """Samples over a Packer with window shuffling: sample k is physical window span*s + perm_s[k - span*s].

    Entering span s packs all of its windows at once (Packer.windows): a rank reads the span whole, never a window
    at a time, so ranks sharing the tokenizing never wait for blocks another rank's reader has not asked for yet."""

    def __init__(self, packer: Packer, span: int, seed: int) -> None:
        self.packer, self.span, self.seed = packer, span, seed
        self._s = -1
        self._rows: Optional[np.ndarray] = None
        self._perm: Optional[np.ndarray] = None
        self._loc: Optional[Tuple[int, int, List[Cursor], int]] = None

    def _enter(self, s: int) -> None:
        lo = s * self.span
        self._rows = None  # the previous span's memory goes before the next is packed
        self._loc = self.packer.locate(lo)
        self._rows = self.packer.windows(lo, lo + self.span)
        self._perm = np.random.default_rng([self.seed, _WINDOWS, s]).permutation(self.span)
        self._s = s

    def window(self, k: int) -> np.ndarray:
        s = k // self.span
        if s != self._s:
            self._enter(s)
        return self._rows[self._perm[k - s * self.span]]

    def locate(self, k: int) -> Tuple[int, int, List[Cursor], int]:
        """Where sample k's span starts: a loader started there packs the span again and skips to k."""
        s = k // self.span
        if s == self._s:
            return self._loc
        return self.packer.locate(s * self.span)


def spans_of(window_shuffle: int) -> int:
    return window_shuffle if window_shuffle > 1 else 0


def samples(packer: Packer, window_shuffle: int, seed: int):
    """The sample view of a packer: itself, or its windows shuffled in spans of `window_shuffle`."""
    return SpanShuffle(packer, window_shuffle, seed) if window_shuffle > 1 else packer


def rank_batches(
    packer, start: int, rank: int, world: int, micro_batch_size: int, state_of: Callable[..., Dict[str, Any]]
) -> Iterator[Batch]:
    row = 0
    while True:
        indices = [start + (row + i) * world + rank for i in range(micro_batch_size)]
        windows = np.stack([packer.window(k) for k in indices]).astype(np.int64)
        row += micro_batch_size
        after = start + row * world
        block, offset, cursors, at = packer.locate(after)
        # Two separate tensors, not overlapping views: a trainer may mask targets in place.
        inputs = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        targets = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        yield Batch(inputs, targets, indices, state_of(after, block, offset, cursors, at))


def make_state(plan: DataPlan, seq_len: int, sample: int, block: int, offset: int,
               cursors: Sequence[Cursor], at: Optional[int] = None) -> Dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "sample": int(sample),
        "at": int(sample if at is None else at),
        "window_shuffle": spans_of(plan.window_shuffle),
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
        at = int(state.get("at", sample))
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
            "the data section (sources, weights, revisions, text_field, text_split, tokenizer, shuffle_buffer or "
            "window_shuffle) changed since the checkpoint, so its saved data position does not apply; restore the "
            "data section used for that run"
        )
    saved = int(state.get("window_shuffle", 0))
    if saved != spans_of(plan.window_shuffle):
        raise UserError(
            f"the checkpoint's data position was saved with data.window_shuffle={saved}, the config has "
            f"{plan.window_shuffle}: sample indices would mean other windows; resume with data.window_shuffle={saved}"
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
    return Start(sample, block, offset, cursors, at)
