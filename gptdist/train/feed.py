"""Which ranks share the tokenizing work, and where their token cache is; each rank's data report.

The producing ranks are those that read batches: on every data-parallel replica the first and the last pipeline
stage, with all their tensor-parallel ranks (the middle stages read nothing). With data.cache_scope=job (the default)
they are all the job's such ranks and the cache folder is shared by every node (the run directory, which a
multi-node run already shares for its checkpoints); with data.cache_scope=node, each node's ranks share a folder of
their own (`<cache>/node-<hostname>`), so every node tokenizes the stream once, for nodes without a shared
filesystem. data.cache=off: no folder, every rank tokenizes all it reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from gptdist.data.producers import Sharing
from gptdist.data.token_cache import cache_folder, node_folder


def data_sharing(cfg, topology, place, run_dir: Path) -> Sharing:
    folder = cache_folder(cfg.data, run_dir)
    if folder is None:
        return Sharing()
    if cfg.data.cache_scope == "node":
        first = place.rank - place.local_rank  # launchers number a node's ranks contiguously
        candidates = range(first, first + place.local_world_size)
        folder = node_folder(folder)
    else:
        candidates = range(place.world_size)
    producers = [r for r in candidates if topology.reads_data(r)]
    return Sharing(producers.index(place.rank), len(producers), str(folder))


class DataReport:
    """The loader, plus RUN_DIR/data/rank_<r>.json on close: what this rank tokenized, read and reused."""

    def __init__(self, loader, run_dir: Path, rank: int) -> None:
        self._loader, self._run_dir, self._rank = loader, run_dir, rank
        self.blocks_consumed = 0

    def __iter__(self):
        return iter(self._loader)

    def __next__(self):
        return next(self._loader)

    @property
    def stats(self) -> Dict[str, Any]:
        return self._loader.stats

    def close(self) -> None:
        self._loader.close()
        stats = dict(self._loader.stats)  # after close: a block being written at the time is in it
        folder = self._run_dir / "data"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank_{self._rank}.json").write_text(json.dumps({"rank": self._rank, **stats}, indent=1))
