"""The mixed document stream, cut into deterministic blocks: the order, the plan that fixes it, a block's tokens.

Order of documents, all of it a pure function of the seed (nothing depends on timing, workers or ranks):

* each source yields its documents epoch after epoch; with shuffling on, the file order of source i in epoch e
  is a permutation drawn from (seed, i, e), otherwise the sorted order;
* block c holds documents [c*S, (c+1)*S) of the mixed stream (S = data.shuffle_buffer, or 256 when it is 0);
  with a single source a block holds at most one epoch of it (fewer than S when the source has fewer documents:
  a single long document is a block of its own, never S copies of it);
  document n of block c comes from the source drawn for it by a generator seeded with (seed, c), weighted by
  `weight`; each source hands out its documents in its own order, looping epochs independently;
* with shuffling on, the block's documents are permuted by a generator seeded with (seed, c).

A block starts from a cursor: per source [epoch, file position in that epoch's order, documents already taken
from that file]. Those cursors are all a resume needs: reading restarts there, nothing before it is read or
tokenized (stream.py finds and reads a block from them; producers.py and token_cache.py share the work).
Each document's ids are followed by the EOS id; the concatenated blocks are the global token stream.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from gptdist.data.sources import ResolvedSource

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
    hub_retries: int = 5  # transient hub streaming errors retried this many times in a row (streamed.py)
    hub_backoff_s: float = 2.0  # first wait; doubled each retry
    window_shuffle: int = 0  # packed windows per shuffled span (packing.py); 0 or 1: stream order

    @property
    def weights(self) -> np.ndarray:
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        return w / w.sum()

    def initial_cursors(self) -> List[Cursor]:
        return [[0, 0, 0] for _ in self.sources]


def plan_digest(sources: Sequence[ResolvedSource], tokenizer_identity: str, block_size: int, shuffle: bool) -> str:
    """What the blocks' content depends on (the token cache's key; window_shuffle is not in it: it only reorders
    windows), and what must not change between saving a data position and resuming from it."""
    blob = {
        "sources": [[s.spec_path, s.weight, s.text_field, s.text_split, s.hub] for s in sources],
        "tokenizer": tokenizer_identity,
        "block_size": block_size,
        "shuffle": shuffle,
    }
    if len(sources) == 1:
        blob["one_epoch_per_block"] = True  # blocks of one source stop at one epoch (stream.py); older ones did not
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


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
