"""`gptdist compare-loss`: per-step differences and a verdict that fails on a mismatch."""

import json

from gptdist.cli import main


def _run_dir(path, losses):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as fh:
        for step, loss in enumerate(losses, start=1):
            fh.write(json.dumps({"step": step, "loss": loss}) + "\n")
    return path


def test_match_and_mismatch(tmp_path, capsys):
    a = _run_dir(tmp_path / "a", [4.0, 3.5, 3.0])
    b = _run_dir(tmp_path / "b", [4.0, 3.5000001, 3.0])
    c = _run_dir(tmp_path / "c", [4.0, 3.6, 3.0])
    assert main(["compare-loss", str(a), str(b), "--rtol", "1e-6"]) == 0
    assert "MATCH: 3 common steps" in capsys.readouterr().out
    assert main(["compare-loss", str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "<-- over rtol" in out
    assert main(["compare-loss", str(a), str(c), "--steps", "3:3"]) == 0


def test_missing_steps_and_missing_file(tmp_path, capsys):
    a = _run_dir(tmp_path / "a", [4.0, 3.5, 3.0])
    short = _run_dir(tmp_path / "short", [4.0, 3.5])
    assert main(["compare-loss", str(a), str(short)]) == 1
    assert "steps in only one run: [3]" in capsys.readouterr().out
    assert main(["compare-loss", str(a), str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
