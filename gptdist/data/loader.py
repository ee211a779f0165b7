"""The training loader: blocks -> windows -> this rank's micro-batches, prepared ahead in the background.

Blocks come from the token cache (token_cache.py), filled by the producing workers of every rank together, each
block tokenized once (producers.py): a thread of this rank with data.workers = 0, W processes with W > 0. A packing
thread reads the blocks in order, waiting for the ones other ranks produce, and turns them into `prefetch`
micro-batches ahead. Which worker tokenized a block changes nothing: the output is the same for any number of
workers or ranks. Without a cache folder (data.cache=off, tools, tests) this rank tokenizes every block it reads,
in memory.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from gptdist.data.blocks import UNSHUFFLED_BLOCK, DataPlan, TokBlock, plan_digest
from gptdist.data.config import DataConfig
from gptdist.data.packing import Batch, Packer, Start, make_state, parse_state, rank_batches, samples
from gptdist.data.producers import ProcessProducers, ProducerGroup, ProducerStats, ThreadProducer, open_cache
from gptdist.data.sources import resolve_sources
from gptdist.data.stream import BlockMaker, Indexes
from gptdist.data.token_cache import MemoryCache, block_record
from gptdist.data.tokenizer import GPTTokenizer, load_tokenizer

log = logging.getLogger("gptdist.data")


def make_plan(cfg: DataConfig, seed: int) -> Tuple[DataPlan, GPTTokenizer]:
    sources = resolve_sources(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    block = cfg.shuffle_buffer or UNSHUFFLED_BLOCK
    shuffle = cfg.shuffle_buffer > 0
    plan = DataPlan(
        sources=sources,
        tokenizer=cfg.tokenizer,
        seed=seed,
        block_size=block,
        shuffle=shuffle,
        on_bad_file=cfg.on_bad_file,
        user_tokenizers_parallelism=os.environ.get("TOKENIZERS_PARALLELISM"),
        digest=plan_digest(sources, tok.identity, block, shuffle),
        hub_retries=cfg.hub_retries,
        hub_backoff_s=cfg.hub_backoff_s,
        window_shuffle=cfg.window_shuffle,
    )
    return plan, tok


def sequential_blocks(plan: DataPlan, start_block: int = 0, cursors=None) -> Iterator[TokBlock]:
    """Tokenized blocks from `start_block` on, in this thread, without any cache."""
    tok = load_tokenizer(plan.tokenizer)
    maker = BlockMaker(plan, Indexes(plan, MemoryCache()))
    cur = [list(c) for c in (cursors or plan.initial_cursors())]
    c = start_block
    while True:
        block, cur = maker.tokenized(tok, c, cur)
        yield block
        c += 1


def iter_samples(cfg: DataConfig, *, seq_len: int, seed: int, start: int = 0) -> Iterator[Tuple[int, List[int]]]:
    """The global sample sequence from `start` on: (index, the seq_len+1 token window). Runs in the caller."""
    plan, _ = make_plan(cfg, seed)
    packer = samples(Packer(sequential_blocks(plan), seq_len, Start(), on_block=_BadFileLog().see),
                     plan.window_shuffle, plan.seed)
    k = start
    while True:
        yield k, packer.window(k).tolist()
        k += 1


def build_train_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    state: Optional[Dict[str, Any]] = None,
    producers: Optional[ProducerGroup] = None,
) -> "TrainLoader":
    """This data-parallel rank's loader. `producers` says which producing rank this is, of how many, and the cache
    folder they share (default: this rank alone, in memory)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError("seq_len and micro_batch_size must be positive")
    plan, _ = make_plan(cfg, seed)
    start = parse_state(state, plan, seq_len)
    return TrainLoader(plan, start, seq_len, micro_batch_size, dp_rank, dp_size, cfg.workers, cfg.prefetch,
                       producers or ProducerGroup())


@dataclass
class _Failure:
    exc: BaseException


class _BadFileLog:
    """Logs each skipped bad file once (worker processes all read every file) and keeps the count."""

    def __init__(self) -> None:
        self.files: Dict[str, str] = {}

    def see(self, block: TokBlock) -> None:
        for path, reason in block.bad:
            if path not in self.files:
                self.files[path] = reason
                log.warning(
                    "skipping bad data file %s: %s (data.on_bad_file=skip; %d file(s) skipped so far)",
                    path, reason, len(self.files),
                )


class TrainLoader:
    """An endless iterator of this rank's Batch objects. Close it (or use `with`) to stop the background work."""

    def __init__(
        self, plan: DataPlan, start: Start, seq_len: int, micro_batch_size: int,
        dp_rank: int, dp_size: int, workers: int, prefetch: int, producers: ProducerGroup = ProducerGroup(),
    ) -> None:
        self.plan = plan
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.start_state = make_state(plan, seq_len, start.sample, start.block, start.offset, start.cursors or [],
                                      start.at)
        self._bad = _BadFileLog()
        self._error: Optional[BaseException] = None
        self._producer = _Producer(self, start, workers, prefetch, producers)
        # Runs on close(), garbage collection or interpreter exit, whichever comes first: no hang at exit.
        self._finalizer = weakref.finalize(self, self._producer.close)

    @property
    def bad_files(self) -> Dict[str, str]:
        return dict(self._bad.files)

    @property
    def stats(self) -> Dict[str, int]:
        """What this rank did for its data: blocks/documents/tokens it tokenized (its producing workers, and any
        block it had to tokenize itself), blocks it read, and the first block it read."""
        return self._producer.blocks.stats()

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Batch:
        if self._error is not None:
            raise self._error
        item = self._producer.get()
        if isinstance(item, _Failure):
            self._error = item.exc
            raise item.exc
        return item

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockReader:
    """Blocks in order from the cache: this rank's reader. Tells the producers where it is; waits for blocks other
    workers make; re-tokenizes a block that is damaged, or that does not come within `wait_s`."""

    def __init__(self, plan: DataPlan, cache, start: Start, producer, wait_s: float = 300.0) -> None:
        self.plan, self.cache, self.producer, self.wait_s = plan, cache, producer, wait_s
        self.next = start.block
        self.cursors = [list(c) for c in (start.cursors or plan.initial_cursors())]
        self.read = 0
        self.damaged = 0  # damaged cache blocks found (and tokenized again)
        self.first = -1
        self.here = ProducerStats()  # blocks this reader had to tokenize itself
        self._maker = None

    def __iter__(self) -> "BlockReader":
        return self

    def __next__(self) -> TokBlock:
        c = self.next
        self.producer.reader_reached(c)
        delay, waited = 0.001, 0.0
        while True:
            tokens, meta, problem = self.cache.get_block(c)
            if tokens is not None:
                break
            if problem is not None:
                log.warning("%s; tokenizing it again", problem)
                self.damaged += 1
                tokens, meta = self._tokenize_here(c)
                break
            self.producer.check()
            if waited > self.wait_s:
                log.warning("token cache block %d did not appear within %.0f s (is the rank that owns it alive?); "
                            "tokenizing it here", c, self.wait_s)
                tokens, meta = self._tokenize_here(c)
                break
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.05)
        if self.first < 0:
            self.first = c
        self.read += 1
        self.cursors = meta["end"]
        self.next = c + 1
        bad = [tuple(x) for x in meta.get("bad") or []]
        return TokBlock(c, tokens, [list(x) for x in meta["start"]], int(meta["documents"]), bad)

    def _tokenize_here(self, c: int):
        if self._maker is None:
            self._maker = (BlockMaker(self.plan, Indexes(self.plan, self.cache)), load_tokenizer(self.plan.tokenizer))
        maker, tok = self._maker
        block, end = maker.tokenized(tok, c, self.cursors)
        self.here.add(block, self.cache.put_tokenized(block, end))
        self.cache.get_block(c)  # a memory cache hands each block out once
        return block.tokens, block_record(block, end)

    def stats(self) -> Dict[str, int]:
        made, here = self.producer.totals(), self.here
        return {"blocks_tokenized": made["blocks"] + here.blocks,
                "documents_tokenized": made["documents"] + here.documents,
                "tokens": made["tokens"] + here.tokens, "blocks_read": self.read, "first_block": self.first,
                "blocks_reused": made["reused"], "indexes_built": made["indexes_built"],
                "bytes_written": made["bytes_written"] + here.bytes_written, "index_bytes": made["index_bytes"],
                "blocks_damaged": self.damaged + made["refused"]}


class _Producer:
    """The background side: holds no reference to the TrainLoader, so an unclosed loader can still be collected."""

    def __init__(self, loader: TrainLoader, start: Start, workers: int, prefetch: int,
                 producers: ProducerGroup) -> None:
        self.queue: "queue.Queue[Any]" = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.workers = workers
        self._tmp = None
        bad, plan = loader._bad, loader.plan
        cache_dir = producers.cache_dir
        if cache_dir is None and workers > 0:
            # Worker processes need a folder to hand blocks over: a private one, removed at close.
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="gptdist-blocks-")
            cache_dir = self._tmp.name
        cache = open_cache(plan, cache_dir)
        total = producers.ranks * max(1, workers)
        first = producers.global_worker(0, workers)
        lookahead = total + 1  # one block ahead per worker (module docstring of producers.py)
        cursors = start.cursors or plan.initial_cursors()
        if workers > 0:
            # Worker processes start here, in the caller's thread, never from the packing thread.
            self.producer = ProcessProducers(plan, cache_dir, start.block, cursors, first, workers, total, lookahead)
        else:
            self.producer = ThreadProducer(plan, cache, start.block, cursors, first, total, lookahead)
        self.blocks = BlockReader(plan, cache, start, self.producer)
        packer = samples(Packer(self.blocks, loader.seq_len, start, on_block=bad.see), plan.window_shuffle,
                         plan.seed)
        seq_len = loader.seq_len

        def state_of(sample: int, block: int, offset: int, cursors: List[List[int]], at: int) -> Dict[str, Any]:
            return make_state(plan, seq_len, sample, block, offset, cursors, at)

        batches = rank_batches(packer, start.sample, loader.dp_rank, loader.dp_size, loader.micro_batch_size, state_of)
        self.thread = threading.Thread(target=self._run, args=(batches,), name="gptdist-data", daemon=True)
        self.thread.start()

    def _run(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it (UserError stays a UserError)
            if not self.stop.is_set():
                self._put(_Failure(exc))

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        while True:
            try:
                return self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    if self.stop.is_set():
                        raise RuntimeError("the data loader is closed") from None
                    raise RuntimeError("the data loader's background thread ended without a result") from None

    def close(self) -> None:
        self.stop.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10.0)
        self.producer.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
