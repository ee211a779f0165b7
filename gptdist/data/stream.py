"""Block c of the document stream, found and read without reading the blocks before it.

The order of documents is blocks.py's (a pure function of the seed: per-epoch file orders, per-block mixing draws,
per-block permutation). What makes a block locatable is that its composition needs only numbers: how many
documents of each source block c takes (the mixing draws) and how many documents each file holds (its index,
doc_index.py). So the source cursors at any block follow from the cursors at an earlier one by arithmetic, and a
block's documents are read by positioned reads of just those documents. A resume from block 100,000 costs what a
resume from block 100 does.

Sources that cannot be indexed (compressed files, hub datasets) are read forward through `datasets` streaming,
from the newest position saved in the token cache at or before the cursor (streamed.py).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gptdist.data.blocks import _FILES, _MIX, _PERM, Cursor, DataPlan, TokBlock, tokenize_block
from gptdist.data.doc_index import DocIndex, build_index, file_key, indexable
from gptdist.data.reader import BadFile, SourceReader
from gptdist.data.sources import ResolvedSource
from gptdist.data.streamed import StreamedUnit
from gptdist.errors import UserError

log = logging.getLogger("gptdist.data")
ReportFn = Callable[[str, str], None]


class Stopped(Exception):
    """The loader closed while this worker waited for another's document index."""


class Indexes:
    """Document indexes of every file, from the cache or built (and stored) on first use. With several ranks
    sharing a cache, each file is indexed by the rank it is assigned to (`owner(position) == me`); the others
    wait for its index, and build it themselves only if it does not come (`wait_s`)."""

    def __init__(self, plan: DataPlan, cache, me: int = 0, producers: int = 1, wait_s: float = 120.0,
                 stop=None) -> None:
        self.plan, self.cache, self.me, self.producers, self.wait_s = plan, cache, me, producers, wait_s
        self.stop = stop  # Event-like: set when the loader closes, ending a wait at once (Stopped)
        self._mem: Dict[Tuple[int, int], DocIndex] = {}
        self.keys = {(s.index, i): file_key(f, s.text_split, s.text_field)
                     for s in plan.sources if s.hub is None for i, f in enumerate(s.files) if indexable(f)}
        self.built = 0  # indexes this process built
        self.bytes_written = 0

    def get(self, src: ResolvedSource, i: int) -> DocIndex:
        got = self._mem.get((src.index, i))
        if got is not None:
            return got
        key = self.keys[(src.index, i)]
        index = self.cache.load_index(key, src.files[i].path)
        if index is None:
            mine = (src.index * 7919 + i) % self.producers == self.me
            deadline = time.monotonic() + (0 if mine else self.wait_s)
            while index is None and time.monotonic() < deadline:
                if self.stop is not None and self.stop.is_set():
                    raise Stopped()
                time.sleep(0.05)
                index = self.cache.load_index(key, src.files[i].path)
            if index is None:
                index = build_index(src.files[i], src.text_split, src.text_field)
                self.bytes_written += self.cache.save_index(key, index)
                self.built += 1
        self._mem[(src.index, i)] = index
        return index


class SourceDocs:
    """One source's documents: counts per file and reads by (file, first, last), indexed or streamed."""

    def __init__(self, src: ResolvedSource, plan: DataPlan, indexes: Indexes, report: ReportFn) -> None:
        self.src, self.plan, self.indexes, self.report = src, plan, indexes, report
        self.reader = SourceReader(src, plan.on_bad_file, report)
        self._streamed: Dict[int, StreamedUnit] = {}  # the unindexed unit being read (one at a time)
        self._reported: set = set()

    @property
    def n_units(self) -> int:
        return self.src.n_units

    def _indexed(self, i: int) -> bool:
        return self.src.hub is None and indexable(self.src.files[i])

    def at_least(self, i: int, n: int, floor: int) -> int:
        """min(n, documents in unit i): exact from an index; a streamed unit is read only as far as n (and need
        not keep the documents before `floor`)."""
        if self._indexed(i):
            index = self.indexes.get(self.src, i)
            if index.mode == "bad":
                self._bad(i, index)
                return 0
            return min(n, index.n_docs)
        return self._stream(i).at_least(n, floor)

    def read(self, i: int, lo: int, hi: int) -> List[str]:
        if self._indexed(i):
            return self.indexes.get(self.src, i).read(lo, hi)
        return self._stream(i).read(lo, hi)

    def _stream(self, i: int) -> StreamedUnit:
        if i not in self._streamed:
            unit = StreamedUnit(self.reader, i, self.indexes.cache, keep=2 * self.plan.block_size,
                                retries=self.plan.hub_retries, backoff_s=self.plan.hub_backoff_s)
            self._streamed = {i: unit}  # one unit at a time
        return self._streamed[i]

    def _bad(self, i: int, index: DocIndex) -> None:
        if i in self._reported:
            return
        self._reported.add(i)
        self.reader.bad_file(i, BadFile(index.bad or "cannot be read", line=index.bad_line))  # fail: UserError


class Positions:
    """Cursor arithmetic over one source's epochs: [epoch, file position in the epoch's order, documents used].

    Cursors mean what blocks.SourceStream's do: after the last document taken, the cursor stays on that file."""

    def __init__(self, docs: SourceDocs, seed: int, shuffle: bool) -> None:
        self.docs, self.seed, self.shuffle = docs, seed, shuffle
        self._orders: Dict[int, List[int]] = {}

    def file_order(self, epoch: int) -> List[int]:

        if epoch not in self._orders:
            n = self.docs.n_units
            if not self.shuffle or n < 2:
                order = list(range(n))
            else:
                rng = np.random.default_rng([self.seed, _FILES, self.docs.src.index, epoch])
                order = rng.permutation(n).tolist()
            self._orders = {epoch: order}
        return self._orders[epoch]

    def take(self, cursor: Sequence[int], k: int, once: bool = False) -> Tuple[List[Tuple[int, int, int]], Cursor]:
        """The next k documents after `cursor`, as (file, first, last+1) runs, and the cursor after them.

        once: never more documents than one epoch holds. Once this take has gone through a whole epoch (start to
        end) it knows that count and stops there: one long document per file gives a block of that file once, not
        k copies of it."""
        epoch, fpos, used = (int(x) for x in cursor)
        runs: List[Tuple[int, int, int]] = []
        out: Cursor = [epoch, fpos, used]
        dry = 0  # files in a row with no document left: more than a whole epoch's worth means an empty source
        taken, epoch_from = 0, (0 if fpos == 0 and used == 0 else None)  # documents; taken when this epoch began
        while k > 0:
            order = self.file_order(epoch)
            if fpos >= len(order):
                whole = taken - epoch_from if epoch_from is not None else 0  # documents of the epoch just ended
                if once and whole > 0:
                    k = min(k, whole - taken)
                    if k <= 0:
                        break
                epoch, fpos, used = epoch + 1, 0, 0
                epoch_from = taken
                continue
            f = order[fpos]
            n = self.docs.at_least(f, used + k, used)  # = used + k while the file has that many
            if used < n:
                step = min(k, n - used)
                runs.append((f, used, used + step))
                used += step
                k -= step
                taken += step
                out = [epoch, fpos, used]
                dry = 0
                if k == 0:
                    break
            else:
                dry += 1
                if dry > len(order):
                    self._empty()
            fpos, used = fpos + 1, 0
        return runs, out

    def _empty(self) -> None:
        src = self.docs.src
        bad = len(self.docs._reported) + len(self.docs.reader.bad)
        extra = f" ({bad} bad file(s) skipped)" if bad else ""
        raise UserError(f"{src.describe()}: empty source, no non-empty document in any of its {src.n_units} file(s)"
                        f"{extra}; point it at data with text")


class BlockMaker:
    """Block c's documents in their final order, from the cursors at its start; and the cursors after it."""

    def __init__(self, plan: DataPlan, indexes: Indexes, report: Optional[ReportFn] = None) -> None:
        self.plan = plan
        # Files newly skipped as bad go with the next block (TokBlock.bad); its reader logs each once.
        self.bad: List[Tuple[str, str]] = []
        rep = report or (lambda path, reason: self.bad.append((path, reason)))
        self.sources = [SourceDocs(s, plan, indexes, rep) for s in plan.sources]
        self.positions = [Positions(d, plan.seed, plan.shuffle) for d in self.sources]
        # One source: a block holds at most one epoch of it (a single long document is not repeated block_size
        # times). Several: the weights decide, by documents, as they ask.
        self.once = len(self.sources) == 1
        self._last: Optional[Tuple[List[str], np.ndarray]] = None  # the last block's documents and tokens

    def choices(self, c: int) -> np.ndarray:
        size, n = self.plan.block_size, len(self.sources)
        if n == 1:
            return np.zeros(size, dtype=np.int64)
        return np.random.default_rng([self.plan.seed, _MIX, c]).choice(n, size=size, p=self.plan.weights)

    def advance(self, c: int, cursors: Sequence[Sequence[int]]) -> List[Cursor]:
        """The cursors after block c, without reading any document."""
        counts = np.bincount(self.choices(c), minlength=len(self.sources))
        return [pos.take(cur, int(k), self.once)[1] for pos, cur, k in zip(self.positions, cursors, counts)]

    def cursors_at(self, target: int, block: int, cursors: Sequence[Sequence[int]]) -> List[Cursor]:
        cur = [list(map(int, c)) for c in cursors]
        for c in range(block, target):
            cur = self.advance(c, cur)
        return cur

    def documents(self, c: int, cursors: Sequence[Sequence[int]]) -> Tuple[List[str], List[Cursor]]:
        choice = self.choices(c)
        counts = np.bincount(choice, minlength=len(self.sources))
        flat: List[str] = []
        after: List[Cursor] = []
        for docs, pos, cur, k in zip(self.sources, self.positions, cursors, counts):
            runs, new = pos.take(cur, int(k), self.once)
            for f, lo, hi in runs:
                flat.extend(docs.read(f, lo, hi))
            after.append(new)
        if self.once:
            ordered = flat  # one source: drawn in order (a block cut at one epoch holds fewer than block_size)
        else:
            ordered = [""] * len(flat)
            for k, p in enumerate(np.argsort(choice, kind="stable").tolist()):  # each document where it was drawn
                ordered[p] = flat[k]
        if self.plan.shuffle:
            perm = np.random.default_rng([self.plan.seed, _PERM, c]).permutation(len(ordered)).tolist()
            ordered = [ordered[p] for p in perm]
        return ordered, after

    def tokenized(self, tok, c: int, cursors: Sequence[Sequence[int]]) -> Tuple[TokBlock, List[Cursor]]:
        docs, after = self.documents(c, cursors)
        bad, self.bad = self.bad, []
        if self._last is not None and self._last[0] == docs:
            tokens = self._last[1]  # the same documents as the block before (one long document, block after block)
        else:
            tokens = tokenize_block(tok, docs)
            self._last = (docs, tokens)
        return TokBlock(c, tokens, [list(x) for x in cursors], len(docs), bad), after
