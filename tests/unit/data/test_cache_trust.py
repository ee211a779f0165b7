"""A token cache is data to verify, not data to trust: every record is sealed with this user's secret key and binds
where it is stored, so an edited record, a block copied under another number, an index put under another file's key
or naming another file are found, counted, and tokenized again from the source; the training text stays the
source's. The key file is made private; a key others can read is refused."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat

import pytest

from gptdist.data import build_train_loader
from gptdist.data.producers import ProducerGroup
from gptdist.errors import UserError
from tests.data_helpers import data_cfg, write_text_files

SEQ = 15
KW = dict(seq_len=SEQ, micro_batch_size=4, dp_rank=0, dp_size=1, seed=4)


@pytest.fixture(autouse=True)
def _own_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTDIST_CACHE_KEY_FILE", str(tmp_path / "keys" / "cache.key"))


def _batches(cfg, n, cache=None):
    with build_train_loader(cfg, state=None, producers=ProducerGroup(cache_dir=str(cache) if cache else None),
                            **KW) as loader:
        return [(b.indices, b.inputs.tolist()) for b in itertools.islice(loader, n)], loader.stats


def _records(cache, c):
    block_dir = next(cache.glob("blocks/*"))
    return block_dir / f"{c:09d}.json", block_dir / f"{c:09d}.tok"


def test_poisoned_blocks_are_found_and_tokenized_again(tiny, tmp_path):
    cfg = data_cfg(tiny)
    cache = tmp_path / "cache"
    reference, _ = _batches(cfg, 30)  # no cache: the source's text
    first, stats = _batches(cfg, 30, cache)
    assert first == reference and stats["blocks_tokenized"] >= 4

    # An edited record (another document count and end cursor, the JSON still valid).
    record, _ = _records(cache, 1)
    meta = json.loads(record.read_text())
    meta["documents"] += 1
    record.write_text(json.dumps(meta))
    # A block copied under another number: block 3's record and tokens as block 2.
    for a, b in zip(_records(cache, 3), _records(cache, 2)):
        shutil.copyfile(a, b)
    # Tokens changed and their checksum recomputed by someone without the key.
    record, tok = _records(cache, 0)
    data = bytearray(tok.read_bytes())
    data[0:2] = data[2:4]
    tok.write_bytes(bytes(data))
    meta = json.loads(record.read_text())
    from gptdist.data.token_cache import checksum

    meta["checksum"] = checksum(bytes(data))
    record.write_text(json.dumps(meta))

    again, stats = _batches(cfg, 30, cache)
    assert again == reference
    # Each found and counted (a block the read-ahead rewrites while this rank reads it may be counted twice).
    assert stats["blocks_damaged"] >= 3 and stats["blocks_tokenized"] >= 3, stats


def test_an_index_names_no_file_and_a_foreign_one_is_rebuilt(tiny, tmp_path):
    corpus = tmp_path / "corpus"
    write_text_files(corpus, 3, 20, seed=9)
    secret = tmp_path / "secret.txt"
    secret.write_text("\n\n".join(f"private line {i} of a file the run must never read" for i in range(50)))
    cfg = data_cfg(tiny, sources=[str(corpus)])
    cache = tmp_path / "cache"
    reference, _ = _batches(cfg, 40)
    first, stats = _batches(cfg, 40, cache)
    assert first == reference and stats["indexes_built"] == 3
    metas = sorted(cache.glob("index/*.json"))
    assert all("path" not in json.loads(m.read_text()) for m in metas)

    # Someone plants a path in one index and swaps another's index for a third file's.
    planted = json.loads(metas[0].read_text())
    planted["path"] = str(secret)
    metas[0].write_text(json.dumps(planted))
    for suffix in (".json", ".npz"):
        shutil.copyfile(metas[2].with_suffix(suffix), metas[1].with_suffix(suffix))
    shutil.rmtree(next(cache.glob("blocks/*")))  # so that the documents are read again through the indexes
    again, stats = _batches(cfg, 40, cache)
    assert again == reference
    assert stats["indexes_built"] == 2, stats  # both refused and built again; the planted path is never read
    text = json.dumps(again)
    assert "private" not in text


def test_a_file_rewritten_with_the_same_size_and_time_gets_a_new_key(tmp_path):
    from gptdist.data.doc_index import file_key
    from gptdist.data.sources import SourceFile

    path = tmp_path / "a.txt"
    path.write_text("hello world\n" * 10)
    st = os.stat(path)
    f = SourceFile(str(path), "text")
    before = file_key(f, "paragraph", "text")
    path.write_text("HELLO world\n" + "hello world\n" * 9)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert file_key(f, "paragraph", "text") != before


def test_the_key_file_is_private_and_a_readable_one_is_refused(tmp_path):
    from gptdist.data import cache_key

    key = cache_key.cache_key()
    path = tmp_path / "keys" / "cache.key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    other = tmp_path / "open.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o644)
    os.environ["GPTDIST_CACHE_KEY_FILE"] = str(other)
    with pytest.raises(UserError, match="readable or writable by others"):
        cache_key.cache_key()
