"""Tokenizing blocks in torch DataLoader worker processes, handed back in block order.

Worker w of W reads the whole document stream (reading is cheap) and tokenizes only blocks c with
(c - start) % W == w. DataLoader asks its workers round-robin and, in order mode, returns their items in that
order: block start, start+1, ... exactly as a single process would produce them.

Each worker loads its own tokenizer (a Rust tokenizer whose thread pool was used must not cross a fork). Unless
the user set TOKENIZERS_PARALLELISM, workers tokenize single-threaded: the processes are the parallelism.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gptdist.data.blocks import DataPlan, TokBlock, produce_blocks
from gptdist.errors import UserError


class _WorkerError:
    """A UserError crossing the process boundary as its one-line message (DataLoader would wrap it in a traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _BlockDataset(IterableDataset):
    def __init__(self, plan: DataPlan, start_block: int, cursors: Sequence[Sequence[int]], n_workers: int) -> None:
        self.plan = plan
        self.start_block = start_block
        self.cursors = [list(c) for c in cursors]
        self.n_workers = n_workers

    def __iter__(self) -> Iterator[object]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        try:
            yield from produce_blocks(self.plan, self.start_block, self.cursors, worker, self.n_workers)
        except UserError as exc:
            yield _WorkerError(str(exc))


def _worker_init(worker_id: int) -> None:
    info = get_worker_info()
    if info is not None and info.dataset.plan.user_tokenizers_parallelism is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)  # no torch math here; keep torch's own pool from claiming cores


def _keep(item: object) -> object:
    return item  # no collation: a block is already one item


class OrderedBlocks:
    """The DataLoader iterator, checked to deliver blocks start, start+1, ...; UserErrors re-raised as such."""

    def __init__(self, loader: DataLoader, start_block: int, plan: DataPlan) -> None:
        with _no_fork_warning(plan):
            self._it = iter(loader)  # forks the workers now
        self._expected = start_block

    def __iter__(self) -> "OrderedBlocks":
        return self

    def __next__(self) -> TokBlock:
        item = next(self._it)
        if isinstance(item, _WorkerError):
            raise UserError(item.message)
        if item.index != self._expected:
            raise RuntimeError(f"data workers delivered block {item.index}, expected {self._expected}")
        self._expected += 1
        return item

    def shutdown(self) -> None:
        stop = getattr(self._it, "_shutdown_workers", None)
        if stop is not None:
            stop()


def start_workers(
    plan: DataPlan, start_block: int, cursors: Sequence[Sequence[int]], workers: int, prefetch: int
) -> OrderedBlocks:
    loader = DataLoader(
        _BlockDataset(plan, start_block, cursors, workers),
        batch_size=None,
        num_workers=workers,
        collate_fn=_keep,
        worker_init_fn=_worker_init,
        prefetch_factor=max(2, -(-prefetch // workers)),
        persistent_workers=False,
    )
    return OrderedBlocks(loader, start_block, plan)


@contextlib.contextmanager
def _no_fork_warning(plan: DataPlan) -> Iterator[None]:
    # If this process already tokenized with the Rust thread pool, tokenizers prints a warning in every forked
    # child unless TOKENIZERS_PARALLELISM is set. The children run single-threaded anyway (see _worker_init),
    # so it is set for the moment of the fork only, and the parent keeps its threads afterwards.
    if plan.user_tokenizers_parallelism is not None or "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
