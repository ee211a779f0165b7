"""Window shuffling: the samples of each span are its stream windows, permuted; ranks sharing the tokenizing read
spans in step."""

from __future__ import annotations

import itertools
import time

import torch

from gptdist.data import build_train_loader, iter_samples
from gptdist.data import loader as loader_mod
from gptdist.data.producers import ProducerGroup
from tests.data_helpers import data_cfg

SEQ, B = 15, 2


def _windows(cfg, n, seed=5):
    return [w for _, w in itertools.islice(iter_samples(cfg, seq_len=SEQ, seed=seed), n)]


def test_each_span_is_a_permutation_of_its_stream_windows(tiny):
    span = 12
    plain = _windows(data_cfg(tiny, window_shuffle=0), 5 * span)
    shuffled = _windows(data_cfg(tiny, window_shuffle=span), 5 * span)
    for s in range(5):
        a, b = plain[s * span:(s + 1) * span], shuffled[s * span:(s + 1) * span]
        assert sorted(a) == sorted(b)
        assert a != b
    # Seeded: another seed, another order of the same windows; the same seed, the same order.
    other = _windows(data_cfg(tiny, window_shuffle=span), span, seed=6)
    assert other != shuffled[:span] or sorted(other) != sorted(shuffled[:span])
    assert _windows(data_cfg(tiny, window_shuffle=span), 2 * span) == shuffled[:2 * span]
    # 1 is off, like 0.
    assert _windows(data_cfg(tiny, window_shuffle=1), 2 * span) == plain[:2 * span]


def test_ranks_sharing_the_tokenizing_read_spans_in_step(tiny, tmp_path, monkeypatch):
    """Two ranks share one cache, each tokenizing its own blocks, consumed in lock step as a trainer does. A rank
    that read a span lazily would wait for blocks the other rank's producer only makes once that rank's reader gets
    there, while that rank sits on a full prefetch queue: the wait ends only at the reader's timeout, after which the
    block is tokenized twice."""
    monkeypatch.setattr(loader_mod.BlockReader.__init__, "__defaults__", (5.0,))  # wait_s: fail fast, not 300 s
    cfg = data_cfg(tiny, window_shuffle=256, prefetch=1)
    loaders = [build_train_loader(cfg, seq_len=SEQ, micro_batch_size=B, dp_rank=r, dp_size=2, seed=5,
                                  producers=ProducerGroup(rank=r, ranks=2, cache_dir=str(tmp_path / "cache")))
               for r in range(2)]
    began = time.monotonic()
    try:
        steps = 2 * 256 // (2 * B)  # two spans
        for _ in range(steps):
            batches = [next(loader) for loader in loaders]
            assert batches[0].state == batches[1].state
        stats = [dict(loader.stats) for loader in loaders]
    finally:
        for loader in loaders:
            loader.close()
    took = time.monotonic() - began
    read = max(s["blocks_read"] for s in stats)
    assert sum(s["blocks_tokenized"] for s in stats) <= read + 4, stats  # each block once (plus the look-ahead)
    assert all(s["blocks_tokenized"] > 0 for s in stats), stats  # the work really was shared
    assert took < 5.0, f"ranks waited on each other: {took:.1f} s"


def test_one_long_document_starts_within_seconds(tiny, tmp_path):
    """A single ~1 MB text file as the only source, default data settings: a shuffle block holds the file once (not
    shuffle_buffer copies), and the first batch comes within seconds."""
    import random

    from gptdist.data import DataConfig
    from tests.data_helpers import paragraph

    rng = random.Random(0)
    parts, size = [], 0
    while size < 1_000_000:
        parts.append(paragraph(rng))
        size += len(parts[-1].encode()) + 2
    path = tmp_path / "input.txt"
    path.write_text("\n\n".join(parts), encoding="utf-8")
    cfg = DataConfig(sources=[str(path)], tokenizer=tiny["tokenizer"])  # text_split=document, shuffle_buffer=1000
    began = time.monotonic()
    with build_train_loader(cfg, seq_len=256, micro_batch_size=8, dp_rank=0, dp_size=1, seed=1) as loader:
        batch = next(loader)
        took = time.monotonic() - began
        stats = dict(loader.stats)
    assert took < 20.0, f"first batch after {took:.1f} s"
    assert stats["documents_tokenized"] <= stats["blocks_tokenized"] + 4, stats  # about one document per block
    # The batch's windows come from across the file's span, not one run of neighbours.
    rows = sorted(batch.indices)
    assert rows == list(range(8))
    assert not torch.equal(batch.inputs[0, 1:], batch.inputs[1, :-1])
