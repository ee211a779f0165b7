"""`gptdist data preview`, `gptdist tokenizer train` and `gptdist bench data` through the real entry point."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from gptdist.cli import main
from gptdist.data import iter_samples, load_tokenizer
from tests.data_helpers import data_cfg


def _recipe(tmp_path, tiny, **data):
    recipe = {
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "vocab_size": 384, "seq_len": 15},
        "train": {"micro_batch_size": 2, "seed": 11},
        "data": {"sources": str(tiny["corpus"]), "tokenizer": tiny["tokenizer"], "text_split": "paragraph",
                 "shuffle_buffer": 8, **data},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_preview_json_is_what_a_rank_receives(tiny, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny, window_shuffle=40)
    code = main(["data", "preview", str(recipe), "train.seed=12", "--rank", "1", "--world", "3", "--start", "5",
                 "--count", "4", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [6, 9, 12, 15]  # K+R, K+R+D, ...
    reference = dict(itertools.islice(iter_samples(data_cfg(tiny, window_shuffle=40), seq_len=15, seed=12), 16))
    assert all(r["ids"] == reference[r["index"]] and len(r["ids"]) == 16 for r in rows)


def test_preview_text_has_a_header_per_sample(tiny, tmp_path, capsys):
    assert main(["data", "preview", str(_recipe(tmp_path, tiny)), "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== sample ") == 2 and "=== sample 0 (rank 0 of 1, 16 tokens) ===" in out


def test_preview_reports_user_errors(tiny, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny, sources=str(tmp_path / "missing"))
    assert main(["data", "preview", str(recipe)]) == 2
    assert "data.sources[0].path=" in capsys.readouterr().err


def test_tokenizer_train_command(tiny, tmp_path, capsys):
    out = tmp_path / "tok"
    code = main(["tokenizer", "train", str(tiny["files"][0]), str(tiny["files"][1]), "--vocab-size", "300",
                 "--out", str(out), "--text-split", "paragraph", "--hf-files"])
    assert code == 0 and "300 tokens" in capsys.readouterr().out
    tok = load_tokenizer(str(out / "tokenizer.json"))
    assert tok.vocab_size == 300 and (out / "merges.txt").is_file()
    assert main(["tokenizer", "train", str(tmp_path / "none.txt"), "--vocab-size", "300", "--out", str(out)]) == 2


def test_bench_data_prints_its_tables(tiny, tmp_path, capsys):
    pytest.importorskip("gptdist.model.gpt")
    recipe = _recipe(tmp_path, tiny, window_shuffle=16)  # a span well under the tokens measured
    code = main(["bench", "data", str(recipe), "--tokens", "3000", "--repeats", "1", "--model-steps", "1",
                 "--worlds", "1,2"])
    assert code == 0
    out = capsys.readouterr().out
    for row in ("loader, workers=0", "loader, workers=2", "anchor: datasets", "model: fwd+bwd+AdamW"):
        assert row in out
    assert "n/a" not in out
    # The world table: one row per world size; the job's tokens tokenized about once (block granularity).
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("world"))
    rows = [line.split() for line in lines[head + 1:head + 3]]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(1.0 <= float(r[3]) < 3.0 for r in rows), rows
    assert main(["bench", "data", str(recipe), "--worlds", "0"]) == 2
