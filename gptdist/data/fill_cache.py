"""`gptdist data cache CONFIG`: tokenize a run's data into its token cache ahead of the run.

The cache is the one training reads (data.cache: RUN_DIR/token_cache, or a folder shared by runs; with
data.cache_scope=node, this node's part of it), filled by the same producing workers training uses, so there is no
separate pre-tokenized format: a run that starts on a filled cache reads its blocks and tokenizes nothing that is
there. Blocks already in the cache are checked (their checksums) and kept. By default it fills what the config's
train.steps consume: steps x global batch x (seq_len + 1) tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from gptdist.errors import UserError


@dataclass
class FillReport:
    folder: Path
    blocks: int
    tokens: int
    cached_before: int  # of those blocks, how many were in the cache already
    stats: Dict[str, int]
    seconds: float


def tokens_for_steps(cfg) -> int:
    return cfg.train.steps * cfg.train.global_batch_size * (cfg.model.seq_len + 1)


def fill_cache(cfg, tokens: int, workers: int, scope_node: Optional[bool] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> FillReport:
    """Blocks 0, 1, ... into the cache until they hold at least `tokens` tokens."""
    # torch/numpy: the data feed loads only when the cache is filled; `gptdist data` starts without it
    from gptdist.data.loader import BlockReader, make_plan
    from gptdist.data.packing import Start
    from gptdist.data.producers import ProcessProducers, open_cache
    from gptdist.data.token_cache import cache_folder, node_folder

    if tokens < 1 or workers < 1:
        raise UserError("--tokens and --workers must be at least 1")
    folder = cache_folder(cfg.data, Path(cfg.run.dir))
    if folder is None:
        raise UserError("data.cache=off: there is no token cache to fill; set data.cache=run (RUN_DIR/token_cache) "
                        "or data.cache=FOLDER")
    if cfg.data.cache_scope == "node" if scope_node is None else scope_node:
        folder = node_folder(folder)
    plan, _ = make_plan(cfg.data, cfg.train.seed)
    cache = open_cache(plan, str(folder))
    t0 = time.perf_counter()
    present = 0
    while cache.block_meta(present) is not None:
        present += 1
    producer = ProcessProducers(plan, str(folder), 0, plan.initial_cursors(), 0, workers, workers, workers + 1)
    reader = BlockReader(plan, cache, Start(), producer)
    done = blocks = 0
    try:
        for block in reader:
            done += len(block.tokens)
            blocks += 1
            if progress is not None:
                progress(done, tokens)
            if done >= tokens:
                break
        stats = reader.stats()
    finally:
        producer.close()
    return FillReport(folder, blocks, done, min(present, blocks), stats, time.perf_counter() - t0)
