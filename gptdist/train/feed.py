"""This rank's batches: the streaming loader, the data position a checkpoint resumes from, and the data report.

The producing ranks are those that read batches: on every data-parallel replica the first and the last pipeline
stage, with all their tensor-parallel ranks (the middle stages read nothing). With data.cache_scope=job (the default)
they are all the job's such ranks and the cache folder is shared by every node (the run directory, which a
multi-node run already shares for its checkpoints); with data.cache_scope=node, each node's ranks share a folder of
their own (`<cache>/node-<hostname>`), so every node tokenizes the stream once, for nodes without a shared
filesystem. data.cache=off: no folder, every rank tokenizes all it reads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from gptdist.data.loader import build_train_loader
from gptdist.data.producers import ProducerGroup
from gptdist.data.token_cache import cache_folder, node_folder


def producer_group(cfg, rank, run_dir: Path) -> ProducerGroup:
    """Which producing rank this is, of how many, and the token cache they share (rank: engine.process.Rank)."""
    folder = cache_folder(cfg.data, run_dir)
    if folder is None:
        return ProducerGroup()
    world, topology = rank.world, rank.topology
    if cfg.data.cache_scope == "node":
        first = world.rank - world.local_rank  # launchers number a node's ranks contiguously
        candidates = range(first, first + world.local_size)
        folder = node_folder(folder)
    else:
        candidates = range(world.size)
    producers = [r for r in candidates if topology.reads_data(r)]
    return ProducerGroup(producers.index(world.rank), len(producers), str(folder))


class DataFeed:
    """The batches this rank trains on, moved to its device, and where in the stream it stands.

    Ranks that read no data (the middle pipeline stages) have no loader; their `batches` is None. The position is
    the loader state after the newest micro-batch consumed: what a checkpoint records and a resume starts from."""

    def __init__(self, cfg, rank, run_dir: Path, state: Optional[Dict[str, Any]], tokenizer_identity: str) -> None:
        self.position: Dict[str, Any] = state or {}
        self.tokenizer_identity = tokenizer_identity  # the data position counts this tokenizer's tokens
        self._run_dir, self._rank = run_dir, rank.world.rank
        self._loader = None
        self.batches: Optional[Iterator] = None
        self.wait_s = 0.0  # time spent waiting for the loader's batches, for the step-time breakdown
        if rank.topology.needs_data:
            layout = rank.layout
            self._loader = build_train_loader(
                cfg.data, seq_len=cfg.model.seq_len, micro_batch_size=layout.micro_batch_size,
                dp_rank=rank.topology.dp_rank, dp_size=layout.dp, seed=cfg.train.seed, state=self.position,
                producers=producer_group(cfg, rank, run_dir))
            self.batches = self._on_device(iter(self._loader), rank.device)

    def _on_device(self, batches: Iterator, device) -> Iterator:
        clock = time.perf_counter
        while True:
            started = clock()
            batch = next(batches, None)
            self.wait_s += clock() - started
            if batch is None:
                return
            self.position = batch.state
            yield batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)

    def checkpoint_state(self) -> Dict[str, Any]:
        return {"data_state": self.position, "tokenizer": self.tokenizer_identity}

    def close(self) -> None:
        """Stop the loader's workers and write RUN_DIR/data/rank_<r>.json: what this rank tokenized, read, reused."""
        if self._loader is None:
            return
        self._loader.close()
        stats = dict(self._loader.stats)  # after close: a block being written at the time is in it
        path = self._run_dir / "data" / f"rank_{self._rank}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rank": self._rank, **stats}, indent=1))
        except OSError as exc:  # a report, not the run's outcome: a full disk costs the file, not the ending
            print(f"gptdist | rank {self._rank}: could not write {path} ({exc.strerror or exc})", file=sys.stderr,
                  flush=True)
