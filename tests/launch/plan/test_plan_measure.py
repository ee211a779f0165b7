"""gptdist plan --measure: the recommended layout run under the launcher, measured against its prediction."""

from __future__ import annotations

import json

import pytest

from gptdist.cli import main
from tests.helpers import write_recipe

GiB = 2**30
KEYS = {"tp", "pp", "dp", "zero_stage", "micro_batch_size", "activation_checkpointing", "model_state_bytes",
        "peak_bytes", "step_time_s", "fits", "recommended"}



def test_plan_measure_runs_the_best_layout_and_prints_both(tmp_path, corpus, tokenizer_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, tmp_path / "unused",
                          model={"n_layer": 4, "d_model": 64, "n_head": 4, "vocab_size": 512, "seq_len": 32},
                          train={"micro_batch_size": 2, "global_batch_size": 4})
    argv = ["plan", str(recipe), "--gpus", "2", "--hardware", "cpu", "--measure", "--measure-count", "1",
            "--measure-steps", "3", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    measured = json.loads(out[out.index("\n[") + 1:])
    assert len(measured) == 1
    m = measured[0]["measured"]
    assert m["ok"], m
    # Predicted against measured for the layout that ran: model states exactly as test_layouts holds them.
    assert m["model_state_bytes"] == pytest.approx(measured[0]["model_state_bytes"], rel=0.02)
    assert m["peak_bytes"] > 0 and m["peak_rss_bytes"] > m["peak_bytes"] and m["step_time_s"] > 0
