"""The benchmarks run for real: bench train with the DeepSpeed row, bench parallel under the launcher."""

from __future__ import annotations

import json
import math
import re

from gptdist.cli import main
from tests.bench_helpers import TINY, table_rows


def test_bench_train_command_with_the_deepspeed_row_and_a_real_training_run(capsys):
    # Builds the DeepSpeed engine in a process of its own (a world of one, no launcher), and runs `gptdist train`.
    tiny = [o for o in TINY if not o.startswith("model.vocab_size")]  # the recipe's tokenizer has 4096 tokens
    code = main(["bench", "train", "configs/tiny-cpu.yaml", *tiny, "--steps", "1", "--warmup", "1", "--repeats", "1",
                 "--train-steps", "20", "--skip", "transformers", "--skip", "plain-chunked", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table_rows(out)
    assert rows["gptdist 1 rank (DeepSpeed ZeRO-0)"][1] != ""
    trained = rows["gptdist train (metrics.jsonl)"]
    assert float(trained[1].replace(",", "")) > 0 and trained[-2].endswith("x")  # tokens/s, and its ratio to plain
    # The breakdown of the training run's steps: every part, and what surrounds the model.
    for part in ("data", "model", "telemetry", "validation", "checkpoint", "stop", "other"):
        assert re.search(rf"^\| {part} \| [\d,]+\.\d\d \|", out, re.M), (part, out)
    assert "| around the model (data, telemetry, stop, other) |" in out


def test_bench_parallel_pipeline_and_zero1_comms(capsys, tmp_path):
    # Three short launches of a 2-layer model: pp2, dp2 ZeRO-1, and ZeRO-1 with the comms logger.
    code = main(["bench", "parallel", "model.n_layer=2", "model.d_model=64", "model.seq_len=32", "--steps", "3",
                 "--layouts", "pp2,dp2 zero1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| pp2 | 2 | 1 |" in out and "| dp2 zero1 | 2 | 1 |" in out
    assert re.search(r"\| dp2 zero1 \| reduce .*\| 2\.\d\d Ψ \| 2 Ψ \|", out), out  # gptdist's default
    assert re.search(r"\| pp2 \| 2 \| 4 \| 20% \| stage 0: \d+%, stage 1: \d+% \|", out), out


def test_bench_checkpoint_measures_both_modes(capsys):
    """A small model (the table in docs/performance.md is the ~60 M default): both modes run, saves are recorded, and
    a checkpoint costs 12 bytes per parameter plus its small files."""
    tiny = ["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.seq_len=32"]
    code = main(["bench", "checkpoint", "configs/tiny-cpu.yaml", *tiny, "--steps", "4", "--every", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith(("| true", "| false"))]
    assert len(rows) == 2, out
    for row in rows:
        per_param = float(row.strip("|").split("|")[-1])
        assert 12.0 <= per_param < 13.0, row
    assert "async blocks training for" in out


def test_bench_peers_runs_every_system_under_the_launcher(capsys, tmp_path):
    # One layout of a tiny model: gptdist, the HF Trainer with DeepSpeed ZeRO-2 and the deepspeed.initialize loop,
    # each under the deepspeed launcher at world 2.
    code = main(["bench", "peers", "configs/tiny-cpu.yaml", "model.n_layer=2", "model.d_model=64", "model.seq_len=32",
                 "--steps", "20", "--repeats", "1", "--layouts", "w2z2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("| 2 | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(float(c.replace(",", "")) > 0 for c in cells[2:5]), row
    assert cells[5].endswith("x") and cells[6].endswith("x"), row
    assert "| 1 | 1 |" not in out  # only the layout asked for


def test_bench_quality_trains_both_sides_on_the_same_windows(capsys, tmp_path, corpus):
    """The shipped character-level recipe on a small text made here: both sides train and are scored."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt")))[:60_000]
    n = int(len(text) * 0.9)
    (tmp_path / "train.txt").write_text(text[:n], encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[n:], encoding="utf-8")
    assert main(["tokenizer", "train", "--char", str(tmp_path / "train.txt"), str(tmp_path / "val.txt"),
                 "--out", str(tmp_path)]) == 0
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    code = main(["bench", "quality", "configs/shakespeare-char.yaml", f"data.sources={tmp_path / 'train.txt'}",
                 f"data.tokenizer={tmp_path / 'tokenizer.json'}", f"eval.data={tmp_path / 'val.txt'}",
                 f"model.vocab_size={len(vocab)}", "train.steps=3", "train.warmup_steps=1", "--eval-windows", "16",
                 "--seeds", "1,2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "validation on 16 windows" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert len(rows) == 4 and all(math.isfinite(float(r[-2])) for r in rows), out
    assert "mean val loss over 2 seed(s)" in out
