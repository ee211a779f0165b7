"""The token cache: filled ahead by `gptdist data cache`, reused without tokenizing, safe against damage and changed
sources; and a resume that costs the same wherever it starts.

Loaders here run in the test process as one rank of one; what several ranks and the real launcher do is in
test_data_scale.py.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from pathlib import Path

import yaml

from gptdist.cli import main
from gptdist.data import DataConfig, build_train_loader
from gptdist.data.producers import ProducerGroup
from tests.data_helpers import data_cfg, write_text_files

SEQ = 15
KW = dict(seq_len=SEQ, micro_batch_size=4, dp_rank=0, dp_size=1, seed=4)


def _batches(cfg: DataConfig, n: int, cache=None, state=None, workers=0):
    with build_train_loader(cfg.model_copy(update={"workers": workers}), state=state,
                            producers=ProducerGroup(cache_dir=str(cache) if cache else None), **KW) as loader:
        out = [(b.indices, b.inputs.tolist(), b.targets.tolist()) for b in itertools.islice(loader, n)]
        return out, loader.stats


def _recipe(tmp_path: Path, tiny, cache: Path, **data) -> Path:
    recipe = {
        "model": {"n_layer": 1, "n_head": 1, "d_model": 32, "vocab_size": 384, "seq_len": SEQ},
        "train": {"steps": 20, "micro_batch_size": 4, "global_batch_size": 4, "seed": 4},
        "data": {"sources": str(tiny["corpus"]), "tokenizer": tiny["tokenizer"], "text_split": "paragraph",
                 "shuffle_buffer": 8, "cache": str(cache), **data},
        "run": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_data_cache_fills_what_a_run_then_reads_without_tokenizing(tiny, tmp_path, capsys):
    cache = tmp_path / "cache"
    recipe = _recipe(tmp_path, tiny, cache)
    assert main(["data", "cache", str(recipe), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"token cache {cache}:" in out and "tokenized now by 2 worker(s)" in out, out
    cfg = data_cfg(tiny)  # the recipe's data section
    want = 20 * 4 * (SEQ + 1)
    assert sum(p.stat().st_size for p in cache.glob("blocks/*/*.tok")) // 2 >= want  # uint16 tokens

    reference, _ = _batches(cfg, 20)  # no cache at all
    cached, stats = _batches(cfg, 20, cache)
    assert cached == reference
    assert stats["blocks_tokenized"] == 0 and stats["tokens"] == 0 and stats["indexes_built"] == 0, stats
    assert stats["blocks_read"] > 0

    # Filling again finds everything there.
    assert main(["data", "cache", str(recipe), "--workers", "1"]) == 0
    assert " 0 block(s) (0 tokens) tokenized now" in capsys.readouterr().out

    # With workers the blocks come from the same cache the same way.
    cached_w, stats_w = _batches(cfg, 20, cache, workers=2)
    assert cached_w == reference and stats_w["blocks_tokenized"] == 0, stats_w


def test_damaged_block_is_reported_and_tokenized_again(tiny, tmp_path, caplog):
    cfg = data_cfg(tiny)
    cache = tmp_path / "cache"
    reference, first = _batches(cfg, 30, cache)
    assert first["blocks_tokenized"] >= 4
    blocks = sorted(cache.glob("blocks/*/*.tok"))
    damaged = blocks[2]
    data = bytearray(damaged.read_bytes())
    data[5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="gptdist.data"):
        again, stats = _batches(cfg, 30, cache)
    assert again == reference
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "token cache block 2" in warnings[0] and "checksum" in warnings[0], warnings
    # That block again (and at most the one past the first run's last, which the read-ahead reaches).
    assert stats["blocks_damaged"] == 1 and 1 <= stats["blocks_tokenized"] <= 2, stats
    assert damaged.read_bytes() != bytes(data)  # written again, whole


def test_changed_source_invalidates_what_came_from_it(tiny, tmp_path):
    corpus = tmp_path / "corpus"
    files = write_text_files(corpus, 3, 20, seed=9)
    cfg = data_cfg(tiny, sources=[str(corpus)])
    cache = tmp_path / "cache"
    before, first = _batches(cfg, 40, cache)  # more than an epoch: every file is read
    assert first["indexes_built"] == 3
    same, unchanged = _batches(cfg, 40, cache)
    assert same == before and unchanged["blocks_tokenized"] == 0 and unchanged["indexes_built"] == 0

    # One file changes: a new stream (its blocks are tokenized anew), and only that file is indexed again.
    files[1].write_text(files[1].read_text() + "\n\nA new paragraph the king never said.\n")
    after, changed = _batches(cfg, 40, cache)
    assert changed["indexes_built"] == 1 and changed["blocks_tokenized"] > 0, changed
    assert len(list(cache.glob("blocks/*"))) == 2
    fresh, _ = _batches(cfg, 40)  # what the changed data gives without any cache
    assert after == fresh


def test_resume_costs_the_same_fifty_times_further_into_a_20_mb_corpus(tmp_path, tiny):
    corpus = tmp_path / "big"
    write_text_files(corpus, 8, 30_000, seed=3)  # 8 files, 240,000 paragraphs
    size = sum(p.stat().st_size for p in corpus.iterdir())
    assert size >= 20 * 2**20, size
    seq = 255
    cfg = data_cfg(tiny, sources=[str(corpus)], shuffle_buffer=1000)
    kw = {**KW, "seq_len": seq}
    near, far = 100, 5000
    states = {}
    with build_train_loader(cfg, **kw) as loader:
        for batch in loader:
            nxt = batch.indices[-1] + 1
            if nxt in (near, far):
                states[nxt] = batch.state
            if nxt >= far:
                break

    def first_batch(start: int) -> tuple:
        """Seconds to the first batch, and the bytes this process read meanwhile (/proc/self/io rchar: every thread,
        counted by the kernel rather than by the loader)."""
        gc.collect()  # the test process's heap (every test before this one) is not the loader's cost
        gc.disable()
        try:
            read0 = _rchar()
            t0 = time.perf_counter()
            with build_train_loader(cfg, state=states[start], **kw) as loader:
                batch = next(loader)
                elapsed = time.perf_counter() - t0
                read = _rchar() - read0
                stats = loader.stats
        finally:
            gc.enable()
        assert batch.indices[0] == start
        # What it cost, counted: the document index of the file it resumes in and the block it needs (the
        # producer may have started the next), whatever the position.
        assert stats["indexes_built"] <= 2 and stats["blocks_tokenized"] <= 2, (start, stats)
        return elapsed, read

    # Both cold: no cache, so the document index of the file in use is built again, as on a new machine.
    # Best of 7, interleaved: the intrinsic cost, without the noise of whatever else shares the machine.
    times, reads = {near: [], far: []}, {near: [], far: []}
    for _ in range(7):
        for start in (near, far):
            elapsed, read = first_batch(start)
            times[start].append(elapsed)
            reads[start].append(read)
    # The bytes read do not grow with the position: one file's index pass and one block, near or far.
    file_size = size / 8
    assert min(reads[far]) <= 1.2 * min(reads[near]) and min(reads[far]) <= 2.5 * file_size, (reads, file_size)
    t_near, t_far = min(times[near]), min(times[far])
    assert t_far <= 1.2 * t_near, (times, t_far / t_near)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar")
