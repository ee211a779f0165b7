"""`gptdist plan` as a user sizing a cluster runs it: the table and the recommendation for a GPU preset, the JSON
every layout is listed in, the mistakes it refuses, and `--measure` running a layout here (predicted against
measured). That the predictions are right on CPU, rank by rank, is tests/launch/parallel/test_layouts.py's job."""

from __future__ import annotations

import json

import pytest

from gptdist.cli import main

GiB = 2**30
KEYS = {"tp", "pp", "dp", "zero_stage", "micro_batch_size", "activation_checkpointing", "model_state_bytes",
        "peak_bytes", "step_time_s", "fits", "recommended"}


def test_plan_for_a_16_gpu_cluster_prints_the_table_and_recommends_one(capsys):
    argv = ["plan", "configs/gpt2-1.3b.yaml", "--gpus", "16", "--gpus-per-node", "8", "--gpu-memory", "80GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "16 x H100 SXM 80GB, 8 per node" in out
    assert "not yet been checked against a run on that GPU" in out  # GPU figures are marked until checked
    assert "| layout | accum | model states GiB | peak GiB | required GiB | fits | step s |" in out
    [recommended] = [line for line in out.splitlines() if "**recommended**" in line]
    assert "| yes |" in recommended
    assert "\nrecommended: " in out and "  run it with: parallel.tp=" in out

    assert main([*argv, "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert all(KEYS <= set(p) for p in plans)
    assert all(p["tp"] * p["pp"] * p["dp"] == 16 for p in plans)
    best = [p for p in plans if p["recommended"]]
    assert len(best) == 1 and best[0]["fits"]
    fitting = [p for p in plans if p["fits"]]
    assert best[0]["step_time_s"] == min(p["step_time_s"] for p in fitting)
    assert all(p["peak_bytes"] >= p["model_state_bytes"] for p in plans)
    assert all(p["fits"] == (p["required_bytes"] <= 0.9 * 80 * GiB) for p in plans)

    # What each kind of parallelism is for, in the prediction: ZeRO-1 and ZeRO-3 hold less than ZeRO-0 at the same
    # layout, tensor and pipeline parallelism less than neither.
    def states(tp, pp, zero):
        return next(p["model_state_bytes"] for p in plans
                    if (p["tp"], p["pp"], p["zero_stage"], p["micro_batch_size"], p["activation_checkpointing"])
                    == (tp, pp, zero, 1, False))

    assert states(1, 1, 3) < states(1, 1, 1) < states(1, 1, 0)
    assert states(2, 1, 0) < 0.55 * states(1, 1, 0) and states(1, 2, 0) < 0.55 * states(1, 1, 0)


@pytest.mark.parametrize("argv,words", [
    (["--gpus", "0"], ["--gpus 0", "at least 1"]),
    (["--gpus", "16", "--gpus-per-node", "5"], ["--gpus-per-node 5", "multiple"]),
    (["--gpus", "16", "--gpu-memory", "lots"], ["--gpu-memory 'lots'", "80GiB"]),
    (["--gpus", "16", "--hardware", "tpu"], ["--hardware 'tpu'", "h100"]),
    (["--gpus", "16", "--peak-tflops", "-1"], ["--peak-tflops", "positive"]),
    (["--gpus", "16", "--intra-node-gbps", "0"], ["--intra-node-gbps", "positive"]),
])
def test_plan_refuses_mistakes_in_one_line(argv, words, capsys):
    assert main(["plan", "configs/gpt2-1.3b.yaml", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gptdist:"), err
    for word in words:
        assert word in err[0], err[0]


