"""The mixed document stream, cut into deterministic blocks, and the tokenization of one block.

Order of documents, all of it a pure function of the seed (nothing depends on timing, workers or ranks):

* each source yields its documents epoch after epoch; with shuffling on, the file order of source i in epoch e
  is a permutation drawn from (seed, i, e), otherwise the sorted order;
* block c holds documents [c*S, (c+1)*S) of the mixed stream (S = data.shuffle_buffer, or 256 when it is 0);
  document n of block c comes from the source drawn for it by a generator seeded with (seed, c), weighted by
  `weight`; each source hands out its documents in its own order, looping epochs independently;
* with shuffling on, the block's documents are permuted by a generator seeded with (seed, c).

A block starts from a cursor: per source [epoch, file position in that epoch's order, documents already taken
from that file]. Those cursors are all a resume needs: reading restarts there, nothing before it is tokenized.
Each document's ids are followed by the EOS id; the concatenated blocks are the global token stream.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from gptdist.data.reader import ReportFn, SourceReader
from gptdist.data.sources import ResolvedSource
from gptdist.errors import UserError

UNSHUFFLED_BLOCK = 256  # documents per block when data.shuffle_buffer is 0 (blocks still bound the work per step)
# Distinct first words of the seed sequences, so the draws for files, mixing and permutation never coincide.
_FILES, _MIX, _PERM = 0x46494C45, 0x4D495820, 0x5045524D

Cursor = List[int]  # [epoch, file position, documents used from that file]


@dataclass
class DataPlan:
    """Everything a process needs to rebuild the block stream: plain data, pickled into worker processes."""

    sources: List[ResolvedSource]
    tokenizer: str
    seed: int
    block_size: int
    shuffle: bool
    on_bad_file: str
    user_tokenizers_parallelism: Optional[str] = None  # TOKENIZERS_PARALLELISM as the user set it, if at all
    digest: str = ""

    @property
    def weights(self) -> np.ndarray:
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        return w / w.sum()

    def initial_cursors(self) -> List[Cursor]:
        return [[0, 0, 0] for _ in self.sources]


def plan_digest(sources: Sequence[ResolvedSource], tokenizer_identity: str, block_size: int, shuffle: bool) -> str:
    """What must not change between saving a data position and resuming from it."""
    blob = {
        "sources": [[s.spec_path, s.weight, s.text_field, s.text_split, s.hub] for s in sources],
        "tokenizer": tokenizer_identity,
        "block_size": block_size,
        "shuffle": shuffle,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class SourceStream:
    """One source's documents forever (epoch after epoch), with the cursor of the next document."""

    def __init__(self, reader: SourceReader, seed: int, shuffle: bool, cursor: Sequence[int]) -> None:
        self.reader = reader
        self.seed = seed
        self.shuffle = shuffle
        self.cursor: Cursor = [int(c) for c in cursor]
        self._it = self._documents(*self.cursor)

    def file_order(self, epoch: int) -> List[int]:
        n = self.reader.n_units
        if not self.shuffle or n < 2:
            return list(range(n))
        rng = np.random.default_rng([self.seed, _FILES, self.reader.src.index, epoch])
        return rng.permutation(n).tolist()

    def take(self, n: int) -> List[str]:
        return list(itertools.islice(self._it, n))

    def skip(self, n: int) -> None:
        collections.deque(itertools.islice(self._it, n), maxlen=0)

    def _documents(self, epoch: int, fpos: int, skip: int) -> Iterator[str]:
        while True:
            order = self.file_order(epoch)
            whole_epoch = fpos == 0 and skip == 0
            seen = 0
            while fpos < len(order):
                used = 0
                for batch in self.reader.iter_unit(order[fpos]):
                    n = len(batch)
                    seen += n
                    if used + n <= skip:  # before the cursor: read, not used
                        used += n
                        continue
                    for j in range(max(0, skip - used), n):
                        self.cursor = [epoch, fpos, used + j + 1]
                        yield batch[j]
                    used += n
                fpos, skip = fpos + 1, 0
            if whole_epoch and seen == 0:
                bad = f" ({len(self.reader.bad)} bad file(s) skipped)" if self.reader.bad else ""
                raise UserError(
                    f"{self.reader.src.describe()}: empty source, no non-empty document in any of its "
                    f"{self.reader.n_units} file(s){bad}; point it at data with text"
                )
            epoch, fpos = epoch + 1, 0
            self.cursor = [epoch, 0, 0]


class BlockStream:
    """Blocks of the mixed stream, in order from `start_block`; each can be read or just stepped over."""

    def __init__(self, plan: DataPlan, start_block: int, cursors: Sequence[Sequence[int]], report: ReportFn) -> None:
        self.plan = plan
        self.next_block = start_block
        self.streams = [
            SourceStream(SourceReader(src, plan.on_bad_file, report), plan.seed, plan.shuffle, cur)
            for src, cur in zip(plan.sources, cursors)
        ]

    def choices(self, c: int) -> np.ndarray:
        size, n = self.plan.block_size, len(self.streams)
        if n == 1:
            return np.zeros(size, dtype=np.int64)
        return np.random.default_rng([self.plan.seed, _MIX, c]).choice(n, size=size, p=self.plan.weights)

    def step(self, read: bool = True) -> Tuple[int, List[Cursor], Optional[List[str]]]:
        """(block index, per-source cursors at its start, its documents in final order or None when not read)."""
        c = self.next_block
        self.next_block += 1
        cursors = [list(s.cursor) for s in self.streams]
        choice = self.choices(c)
        counts = np.bincount(choice, minlength=len(self.streams))
        if not read:
            for stream, k in zip(self.streams, counts):
                stream.skip(int(k))
            return c, cursors, None
        flat: List[str] = []
        for stream, k in zip(self.streams, counts):
            flat.extend(stream.take(int(k)))
        docs: List[str] = [""] * len(flat)
        for k, pos in enumerate(np.argsort(choice, kind="stable").tolist()):  # each document where it was drawn
            docs[pos] = flat[k]
        if self.plan.shuffle:
            docs = [docs[p] for p in np.random.default_rng([self.plan.seed, _PERM, c]).permutation(len(docs)).tolist()]
        return c, cursors, docs


@dataclass
class TokBlock:
    index: int
    tokens: np.ndarray  # int32: every document's ids, each followed by EOS
    cursors: List[Cursor]
    documents: int
    bad: List[Tuple[str, str]] = field(default_factory=list)  # files newly skipped as bad before this block


def tokenize_block(tok, docs: Sequence[str]) -> np.ndarray:
    ids = tok.encode_batch(docs)  # one Rust batch call for the block; it spreads over the Rust thread pool
    eos = tok.eos_id
    total = sum(map(len, ids)) + len(ids)
    return np.fromiter(itertools.chain.from_iterable(itertools.chain(i, (eos,)) for i in ids), np.int32, count=total)


def produce_blocks(
    plan: DataPlan, start_block: int, cursors: Sequence[Sequence[int]], worker: int = 0, n_workers: int = 1
) -> Iterator[TokBlock]:
    """Tokenized blocks start_block + worker, + n_workers, ...; the blocks in between are read, not tokenized."""
    from gptdist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(plan.tokenizer)
    bad: List[Tuple[str, str]] = []
    blocks = BlockStream(plan, start_block, cursors, lambda path, reason: bad.append((path, reason)))
    while True:
        mine = (blocks.next_block - start_block) % n_workers == worker
        c, cur, docs = blocks.step(read=mine)
        if docs is not None:
            yield TokBlock(c, tokenize_block(tok, docs), cur, len(docs), bad[:])
            bad.clear()
