"""Rank sharding, resume across a change of data-parallel size, and worker processes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from gptdist.data import build_train_loader, iter_samples
from gptdist.data.producers import ProcessProducers
from gptdist.data.tokenizer import GPTTokenizer
from tests.data_helpers import data_cfg

SEQ, B = 15, 2


def _run(cfg, world, steps, state=None, seed=5):
    """Every rank's batches for `steps` micro-batches: {rank: [Batch, ...]}."""
    out = {}
    for rank in range(world):
        with build_train_loader(cfg, seq_len=SEQ, micro_batch_size=B, dp_rank=rank, dp_size=world, seed=seed,
                                state=state) as loader:
            out[rank] = list(itertools.islice(loader, steps))
    return out


def _samples(batches):
    """{global index: window ids} from batches (the window is inputs plus the last target)."""
    got = {}
    for batch in batches:
        windows = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
        for k, row in zip(batch.indices, windows.tolist()):
            assert k not in got, f"sample {k} delivered twice"
            got[k] = row
    return got


def _reference(cfg, start, n, seed=5):
    return dict(itertools.islice(iter_samples(cfg, seq_len=SEQ, seed=seed, start=start), n))


@pytest.mark.parametrize("span", [0, 12])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_the_sample_sequence(tiny, world, span):
    cfg = data_cfg(tiny, window_shuffle=span)
    steps = 6
    runs = _run(cfg, world, steps)
    union = {}
    for rank, batches in runs.items():
        for batch in batches:
            assert all(k % world == rank for k in batch.indices)
        got = _samples(batches)
        assert not union.keys() & got.keys()
        union.update(got)
    assert union == _reference(cfg, 0, steps * B * world)
    # The state after the same number of micro-batches is the same on every rank, and JSON-serializable.
    for i in range(steps):
        states = [runs[r][i].state for r in range(world)]
        assert all(s == states[0] for s in states) and json.loads(json.dumps(states[0])) == states[0]
        assert states[0]["sample"] == (i + 1) * B * world


@pytest.mark.parametrize("span", [0, 12])
@pytest.mark.parametrize("before,after", [(2, 3), (3, 1)])
def test_resume_with_another_world_size(tiny, before, after, span):
    cfg = data_cfg(tiny, window_shuffle=span)
    first = _run(cfg, before, 7)
    state = first[0][-1].state
    seen = {}
    for batches in first.values():
        seen.update(_samples(batches))
    assert sorted(seen) == list(range(state["sample"]))
    second = _run(cfg, after, 5, state=json.loads(json.dumps(state)))
    resumed = {}
    for batches in second.values():
        resumed.update(_samples(batches))
    # Exactly the next unseen samples: nothing skipped, nothing seen twice.
    assert sorted(resumed) == list(range(state["sample"], state["sample"] + 5 * B * after))
    assert resumed == _reference(cfg, state["sample"], 5 * B * after)


@pytest.mark.parametrize("span", [0, 12])
def test_resume_does_not_tokenize_earlier_blocks(tiny, monkeypatch, span):
    cfg = data_cfg(tiny, prefetch=1, window_shuffle=span)
    state = _run(cfg, 2, 25)[0][-1].state
    assert state["block"] >= 6, "the test needs a cursor well past the first blocks"
    calls = []
    real = GPTTokenizer.encode_batch

    def counting(self, texts):
        calls.append(len(texts))
        return real(self, texts)

    monkeypatch.setattr(GPTTokenizer, "encode_batch", counting)
    with build_train_loader(cfg, seq_len=SEQ, micro_batch_size=B, dp_rank=1, dp_size=3, seed=5, state=state) as loader:
        batch = next(loader)
        stats = dict(loader.stats)
    assert batch.indices[0] == state["sample"] + 1
    # Only blocks from the cursor's on were tokenized (one call per block), not the ones before it.
    assert stats["first_block"] == state["block"]
    assert 1 <= len(calls) <= 4 and len(calls) < state["block"] and set(calls) == {8}


def test_workers_give_identical_batches(tiny, tmp_path):
    # Two sources mixed by weight, shuffled blocks, rank 1 of 2: every part of the order is exercised.
    extra = tmp_path / "extra.txt"
    extra.write_text("\n\n".join(f"extra paragraph {i} with some words" for i in range(30)), encoding="utf-8")
    sources = [{"path": str(tiny["corpus"]), "weight": 2.0}, {"path": str(extra), "weight": 1.0}]
    plain = data_cfg(tiny, sources=sources, workers=0)
    forked = data_cfg(tiny, sources=sources, workers=2)

    def batches(cfg, state=None):
        with build_train_loader(cfg, seq_len=SEQ, micro_batch_size=3, dp_rank=1, dp_size=2, seed=9,
                                state=state) as loader:
            assert isinstance(loader._producer.producer, ProcessProducers) == (cfg.workers > 0)  # processes really used
            return list(itertools.islice(loader, 25))

    def same(xs, ys):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert x.indices == y.indices and x.state == y.state
            assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)

    a = batches(plain)
    same(a, batches(forked))
    # Resuming in worker mode continues exactly like the single process, which continues the first run.
    c = batches(plain, a[10].state)
    same(c, batches(forked, a[10].state))
    same(c[:14], a[11:])
