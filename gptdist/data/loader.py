"""The training loader: blocks -> windows -> this rank's micro-batches, prepared ahead in the background.

workers == 0: one thread reads, tokenizes (the Rust batch call releases the GIL and uses the Rust thread pool)
and packs `prefetch` micro-batches ahead. workers == W: torch DataLoader worker processes tokenize the blocks,
worker w the blocks c = w, w+W, ... (see workers.py); DataLoader hands them back round-robin, which is block order,
and the same packing thread turns them into micro-batches, so the output is identical to workers == 0.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from gptdist.data.blocks import UNSHUFFLED_BLOCK, DataPlan, TokBlock, plan_digest, produce_blocks
from gptdist.data.config import DataConfig
from gptdist.data.packing import Batch, Packer, Start, make_state, parse_state, rank_batches
from gptdist.data.sources import resolve_sources
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
    )
    return plan, tok


def iter_samples(cfg: DataConfig, *, seq_len: int, seed: int, start: int = 0) -> Iterator[Tuple[int, List[int]]]:
    """The global sample sequence from `start` on: (index, the seq_len+1 token window). Runs in the caller."""
    plan, _ = make_plan(cfg, seed)
    packer = Packer(produce_blocks(plan, 0, plan.initial_cursors()), seq_len, Start(), on_block=_BadFileLog().see)
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
) -> "TrainLoader":
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError("seq_len and micro_batch_size must be positive")
    plan, _ = make_plan(cfg, seed)
    start = parse_state(state, plan, seq_len)
    return TrainLoader(plan, start, seq_len, micro_batch_size, dp_rank, dp_size, cfg.workers, cfg.prefetch)


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
        dp_rank: int, dp_size: int, workers: int, prefetch: int,
    ) -> None:
        self.plan = plan
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.start_state = make_state(plan, seq_len, start.sample, start.block, start.offset, start.cursors or [])
        # Counted on the packing side: blocks this loader tokenized (first_block: where it started, -1 before).
        self.stats: Dict[str, int] = {"blocks_tokenized": 0, "documents_tokenized": 0, "tokens": 0, "first_block": -1}
        self._bad = _BadFileLog()
        self._error: Optional[BaseException] = None
        self._producer = _Producer(self, start, workers, prefetch)
        # Runs on close(), garbage collection or interpreter exit, whichever comes first: no hang at exit.
        self._finalizer = weakref.finalize(self, self._producer.close)

    @property
    def bad_files(self) -> Dict[str, str]:
        return dict(self._bad.files)

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


class _Producer:
    """The background side: holds no reference to the TrainLoader, so an unclosed loader can still be collected."""

    def __init__(self, loader: TrainLoader, start: Start, workers: int, prefetch: int) -> None:
        self.queue: "queue.Queue[Any]" = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.workers = workers
        self._dl_iter = None
        stats, bad, plan = loader.stats, loader._bad, loader.plan

        def seen(block: TokBlock) -> None:
            if stats["blocks_tokenized"] == 0:
                stats["first_block"] = block.index
            stats["blocks_tokenized"] += 1
            stats["documents_tokenized"] += block.documents
            stats["tokens"] += len(block.tokens)
            bad.see(block)

        if workers > 0:
            from gptdist.data.workers import start_workers

            # Worker processes start here, in the caller's thread, never from the packing thread.
            self._dl_iter = start_workers(plan, start.block, start.cursors or plan.initial_cursors(), workers, prefetch)
            blocks: Iterator[TokBlock] = self._dl_iter
        else:
            blocks = produce_blocks(plan, start.block, start.cursors or plan.initial_cursors())
        packer = Packer(blocks, loader.seq_len, start, on_block=seen)
        seq_len = loader.seq_len

        def state_of(sample: int, block: int, offset: int, cursors: List[List[int]]) -> Dict[str, Any]:
            return make_state(plan, seq_len, sample, block, offset, cursors)

        batches = rank_batches(packer, start.sample, loader.dp_rank, loader.dp_size, loader.micro_batch_size, state_of)
        self.thread = threading.Thread(target=self._run, args=(batches,), name="gptdist-data", daemon=True)
        self.thread.start()

    def _run(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it (UserError stays a UserError)
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
        if self._dl_iter is not None:
            shutdown = getattr(self._dl_iter, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self._dl_iter = None
