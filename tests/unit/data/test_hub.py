"""Hub sources, streamed through `datasets`: a network that fails now and then is retried and changes nothing; one
that keeps failing ends in one error naming the source; a resume seeks by the saved `datasets` position instead of
reading the stream again from its first document.

The hub dataset is a real `datasets.IterableDataset` (from a generator with 32 shards, as a hub dataset of 32 Parquet
files streams), returned by `load_dataset` for the test's dataset name: nothing leaves the machine.
"""

from __future__ import annotations

import itertools
import logging
import random

import datasets
import pytest

from gptdist.data import DataConfig, build_train_loader, iter_samples, streamed
from gptdist.errors import UserError
from tests.data_helpers import paragraph

NAME = "gptdist-test/streamed-corpus"
SHARDS, PER_SHARD = 32, 250
SEQ = 31


class FakeHub:
    """Serves NAME; counts the documents it hands out and fails where told (once per listed position)."""

    def __init__(self) -> None:
        rng = random.Random(5)
        self.texts = [[paragraph(rng, f"s{s}d{j}") for j in range(PER_SHARD)] for s in range(SHARDS)]
        self.served = 0
        self.fail_at: list = []  # global document numbers at which to raise, each once
        self.fail_always_after = None

    def dataset(self):
        def gen(shards):
            for s in shards:
                for j, text in enumerate(self.texts[s]):
                    n = s * PER_SHARD + j
                    if self.fail_always_after is not None and n >= self.fail_always_after:
                        raise ConnectionError(f"connection reset by peer at document {n}")
                    if n in self.fail_at:
                        self.fail_at.remove(n)
                        raise ConnectionError(f"connection reset by peer at document {n}")
                    self.served += 1
                    yield {"text": text}

        return datasets.IterableDataset.from_generator(gen, gen_kwargs={"shards": list(range(SHARDS))})


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    real = datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        if path == NAME:
            assert kwargs.get("streaming") is True
            return fake.dataset()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return fake


def _cfg(tiny, **kw) -> DataConfig:
    values = {"sources": [NAME], "tokenizer": tiny["tokenizer"], "shuffle_buffer": 64, "hub_backoff_s": 0.0,
              "window_shuffle": 0}
    values.update(kw)
    return DataConfig(**values)


def _samples(cfg, n):
    return [ids for _, ids in itertools.islice(iter_samples(cfg, seq_len=SEQ, seed=3), n)]


def test_transient_errors_are_retried_and_change_nothing(tiny, hub, caplog):
    clean = _samples(_cfg(tiny), 1500)
    assert hub.served > 1600
    hub.fail_at = [700, 700 + 1, 1500]  # two failures in a row, then one more further on
    with caplog.at_level(logging.WARNING, logger="gptdist.data"):
        flaky = _samples(_cfg(tiny), 1500)
    assert flaky == clean
    retries = [r.getMessage() for r in caplog.records if "while streaming" in r.getMessage()]
    assert len(retries) == 3 and all("data.sources[0]" in m and "ConnectionError" in m for m in retries), retries


def test_a_network_that_stays_down_ends_in_one_error_naming_the_source(tiny, hub):
    hub.fail_always_after = 500
    with pytest.raises(UserError) as err:
        _samples(_cfg(tiny, hub_retries=2), 400)
    message = str(err.value)
    assert message.startswith(f"data.sources[0].path={NAME!r}: streaming the hub dataset failed 3 times"), message
    assert "ConnectionError" in message and "\n" not in message


def test_resume_seeks_by_saved_position_instead_of_rereading(tiny, hub, tmp_path, monkeypatch):
    monkeypatch.setattr(streamed, "SEEK_EVERY", 256)
    cfg = _cfg(tiny)
    straight = _samples(cfg, 6004)
    kwargs = dict(seq_len=SEQ, micro_batch_size=4, dp_rank=0, dp_size=1, seed=3)
    from gptdist.data.producers import ProducerGroup

    producers = ProducerGroup(cache_dir=str(tmp_path / "cache"))
    hub.served = 0
    with build_train_loader(cfg, producers=producers, **kwargs) as loader:
        batches = list(itertools.islice(loader, 1500))  # samples 0-5999
    state = batches[-1].state
    read_before = hub.served
    assert read_before > 6000  # the first run read a good way into the stream

    # A new process resumes: a fresh cache of blocks (none of the ones ahead are tokenized) but the saved positions.
    import shutil

    shutil.rmtree(tmp_path / "cache" / "blocks")
    hub.served = 0
    with build_train_loader(cfg, state=state, producers=producers, **kwargs) as loader:
        first = next(loader)
    assert first.indices == [6000, 6001, 6002, 6003]
    assert [row.tolist() + [t] for row, t in zip(first.inputs, first.targets[:, -1].tolist())] == straight[6000:6004]
    # It read from the newest saved position before the block it needed: the shard's documents before that position
    # (datasets skips inside a shard by reading), at most SEEK_EVERY documents (saved at the end of a streaming
    # batch of 512) and the blocks ahead being prepared; not the thousands before.
    assert hub.served <= PER_SHARD + 256 + 512 + 3 * 64 < read_before / 4, (hub.served, read_before)

    # Without any saved position it still resumes exactly, by reading forward from the start.
    shutil.rmtree(tmp_path / "cache")
    hub.served = 0
    with build_train_loader(cfg, state=state, producers=producers, **kwargs) as loader:
        again = next(loader)
    assert again.indices == first.indices and again.inputs.equal(first.inputs)
    assert hub.served >= read_before - 512 - 3 * 64


def test_a_revision_pins_the_hub_dataset_and_a_changed_one_is_refused_on_resume(tiny, hub, monkeypatch):
    from gptdist.data.loader import make_plan
    from gptdist.data.packing import make_state, parse_state

    seen = []
    fake = datasets.load_dataset

    def recording(path, *args, **kwargs):
        seen.append(kwargs.get("revision"))
        return fake(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    pinned = _cfg(tiny, sources=[{"path": NAME, "revision": "0123abc"}])
    assert len(_samples(pinned, 5)) == 5 and seen and set(seen) == {"0123abc"}

    plan, _ = make_plan(pinned, seed=3)
    state = make_state(plan, SEQ, 8, 0, 0, plan.initial_cursors())
    moved, _ = make_plan(_cfg(tiny, sources=[{"path": NAME, "revision": "4567def"}]), seed=3)
    with pytest.raises(UserError, match="data section"):
        parse_state(state, moved, SEQ)
