"""Tokenizing the stream once per job: every producing worker of every rank tokenizes its share of the blocks into
the token cache, and every rank reads the blocks it needs from there.

Worker g of G (G = producing ranks x max(1, data.workers); the producing ranks are those that read data: every
data-parallel rank, and in each replica the first and last pipeline stages and all their tensor-parallel ranks)
owns blocks c with c mod G == g. It tokenizes an owned block only when its rank's reader is within `lookahead`
blocks of it (G + 1: one block ahead per worker, past the one being read), so a job tokenizes what it consumes
plus that look-ahead,
and each token once. A block already in the cache (a previous run over the same data, `gptdist data cache`, a
restart) is not tokenized again.

With data.workers = 0 the worker is a thread of the rank (the Rust tokenizer releases the GIL); with W > 0 they are
W processes, each with its own tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import queue
import threading
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from gptdist.data.blocks import Cursor, DataPlan
from gptdist.data.doc_index import file_key, indexable
from gptdist.data.stream import BlockMaker, Indexes, Stopped
from gptdist.data.token_cache import CacheDir, MemoryCache
from gptdist.data.tokenizer import load_tokenizer
from gptdist.errors import UserError

log = logging.getLogger("gptdist.data")


@dataclass(frozen=True)
class ProducerGroup:
    """Who shares the tokenizing work: this rank's index among the producing ranks, how many there are, and the
    cache folder they share (None: this rank alone, in memory)."""

    rank: int = 0
    ranks: int = 1
    cache_dir: Optional[str] = None

    def global_worker(self, worker: int, workers: int) -> int:
        return self.rank * max(1, workers) + worker


@dataclass
class ProducerStats:
    blocks: int = 0
    documents: int = 0
    tokens: int = 0
    bytes_written: int = 0
    indexes_built: int = 0
    index_bytes: int = 0  # bytes of document indexes written
    reused: int = 0  # owned blocks found already in the cache
    refused: int = 0  # cached records whose seal or checksum did not hold (tokenized again)

    def add(self, block, bytes_written: int) -> None:
        """One block tokenized and written."""
        self.blocks += 1
        self.documents += block.documents
        self.tokens += len(block.tokens)
        self.bytes_written += bytes_written

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def open_cache(plan: DataPlan, cache_dir: Optional[str]):
    return CacheDir(Path(cache_dir), stream_key(plan)) if cache_dir else MemoryCache()


def stream_key(plan: DataPlan) -> str:
    """What a cached block's content depends on (see token_cache.py)."""
    parts = [plan.digest, str(plan.seed)]
    for src in plan.sources:
        for f in src.files:
            # Compressed files too: their real path, size, time and head/tail fingerprint, not only their name.
            key = file_key(f, src.text_split, src.text_field)
            parts.append(key if indexable(f) else f"{key}|stream")
        if src.hub is not None:
            parts.append("hub:" + "|".join(str(x) for x in src.hub))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def produce(plan: DataPlan, cache, start_block: int, cursors: Sequence[Sequence[int]], me: int, total: int,
            consumer_at, stop, stats: ProducerStats, lookahead: int) -> None:
    """The loop of producing worker `me` of `total` (see the module docstring). `consumer_at()` is the block its
    rank's reader is at; `stop` an Event-like object."""
    tok = load_tokenizer(plan.tokenizer)
    indexes = Indexes(plan, cache, me, total, stop=stop)
    maker = BlockMaker(plan, indexes)
    try:
        _produce(plan, cache, tok, indexes, maker, start_block, cursors, me, total, consumer_at, stop, stats, lookahead)
    except Stopped:
        return


def _produce(plan, cache, tok, indexes, maker, start_block, cursors, me, total, consumer_at, stop, stats, lookahead):
    c = start_block + (me - start_block) % total
    cur: List[Cursor] = maker.cursors_at(c, start_block, cursors)
    while not stop.is_set():
        while c >= consumer_at() + lookahead:
            if stop.wait(0.02):
                return
        meta = cache.block_meta(c)
        if meta is not None and not meta.get("damaged") and "end" in meta:
            end = meta["end"]
            stats.reused += 1
        else:
            if meta is not None:
                log.warning("token cache block %d is refused (%s); tokenizing it again", c, meta.get("why", meta))
                stats.refused += 1
            block, end = maker.tokenized(tok, c, cur)
            stats.add(block, cache.put_tokenized(block, end))
        stats.indexes_built = indexes.built
        stats.index_bytes = indexes.bytes_written
        cur = maker.cursors_at(c + total, c + 1, end)
        c += total


class ThreadProducer:
    """data.workers = 0: one producing thread in this rank."""

    def __init__(self, plan: DataPlan, cache, start_block: int, cursors, me: int, total: int, lookahead: int) -> None:
        self.position = start_block
        self.stats = ProducerStats()
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()

        def run() -> None:
            try:
                produce(plan, cache, start_block, cursors, me, total, lambda: self.position, self._stop,
                        self.stats, lookahead)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                self.error = exc

        self._thread = threading.Thread(target=run, name="gptdist-tokenize", daemon=True)
        self._thread.start()

    def reader_reached(self, block: int) -> None:
        """The rank's reader waits for `block` now: the producers tokenize up to `lookahead` blocks past it."""
        self.position = block

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def totals(self) -> Dict[str, int]:
        return self.stats.as_dict()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _process_main(plan, cache_dir, start_block, cursors, me, total, lookahead, position, stop, errors, counters):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    try:
        # torch: optional here, only to pin the producer process to one thread
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        cache = open_cache(plan, cache_dir)
        produce(plan, cache, start_block, cursors, me, total, lambda: position.value, stop, _Counting(counters),
                lookahead)
    except UserError as exc:
        errors.put(("user", str(exc)))
    except BaseException:  # noqa: BLE001 - reported to the reader, which fails the run with it
        errors.put(("error", traceback.format_exc()))


class _Counting(ProducerStats):
    """ProducerStats whose fields are mirrored into shared counters, so the rank can report a process's work."""

    def __init__(self, counters) -> None:
        object.__setattr__(self, "_counters", counters)
        super().__init__()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        counters = self.__dict__.get("_counters")
        if counters is not None and name in counters:
            counters[name].value = value



class ProcessProducers:
    """data.workers = W > 0: W producing processes of this rank."""

    FIELDS = tuple(f.name for f in fields(ProducerStats))

    def __init__(self, plan: DataPlan, cache_dir: str, start_block: int, cursors, first: int, workers: int,
                 total: int, lookahead: int) -> None:
        ctx = mp.get_context("fork")
        self.position = ctx.Value("q", start_block, lock=False)
        self._stop = ctx.Event()
        self._errors = ctx.Queue()
        self._counters = [{name: ctx.Value("q", 0, lock=False) for name in self.FIELDS} for _ in range(workers)]
        self._procs = []
        for w in range(workers):
            p = ctx.Process(target=_process_main, name=f"gptdist-tokenize-{w}", daemon=True,
                            args=(plan, cache_dir, start_block, [list(c) for c in cursors], first + w, total,
                                  lookahead, self.position, self._stop, self._errors, self._counters[w]))
            p.start()
            self._procs.append(p)

    def reader_reached(self, block: int) -> None:
        """The rank's reader waits for `block` now: the producers tokenize up to `lookahead` blocks past it."""
        self.position.value = block

    def check(self) -> None:
        try:
            kind, message = self._errors.get_nowait()
        except queue.Empty:
            dead = [p for p in self._procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead and not self._stop.is_set():
                raise RuntimeError(f"data worker {dead[0].name} died (exit code {dead[0].exitcode})") from None
            return
        if kind == "user":
            raise UserError(message)
        raise RuntimeError(f"a data worker failed:\n{message}")

    def totals(self) -> Dict[str, int]:
        return {name: sum(c[name].value for c in self._counters) for name in self.FIELDS}

    def close(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self._procs = []
