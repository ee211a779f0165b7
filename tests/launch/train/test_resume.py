"""Resume: killed right after a checkpoint, a run continues exactly (bitwise) in the same layout, closely in any
other layout; a kill during a checkpoint's background write leaves the previous checkpoint, from which the run
continues bitwise. No file of any checkpoint is a pickle. Real launches of launch/train.sh; kills are real SIGKILLs
injected with GPTDIST_FAULTS."""


import json

import pytest

from gptdist.checkpoint.safetensors_io import SafetensorsFile
from gptdist.telemetry.metrics_file import read_metrics
from gptdist.tools.compare_loss import compare, load_losses
from tests.helpers import assert_ok, launch, launch_pair, write_recipe

STEPS = 20
TRAIN = {"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 5}


def _recipe(tmp, corpus, tokenizer_path, run, tp, pp, zero, every=10, precision="auto"):
    return write_recipe(tmp / f"{run.name}.yaml", corpus, tokenizer_path, run, train={**TRAIN, "precision": precision},
                        parallel={"tp": tp, "pp": pp, "zero_stage": zero}, checkpoint={"every": every})


def _whole_and_killed_then_resumed(whole_recipe, cut_recipe, ranks):
    """The uninterrupted run and the run killed after step 10's checkpoint, side by side; then the resume."""
    whole, killed = launch_pair((whole_recipe, [], ranks, None),
                                (cut_recipe, [], ranks, {"GPTDIST_FAULTS": "kill-after-save@10"}))
    assert_ok(whole)
    assert killed.returncode != 0, "the injected kill did not happen"
    resumed = launch(cut_recipe, ranks=ranks)
    assert_ok(resumed)
    return resumed


@pytest.fixture(scope="module")
def runs_3d(tmp_path_factory, corpus, tokenizer_path):
    """(tp 2, pp 2, dp 2, ZeRO-1): one uninterrupted run and one killed after step 10's checkpoint and resumed."""
    tmp = tmp_path_factory.mktemp("resume3d")
    whole, cut = tmp / "whole", tmp / "cut"
    resumed = _whole_and_killed_then_resumed(_recipe(tmp, corpus, tokenizer_path, whole, 2, 2, 1),
                                             _recipe(tmp, corpus, tokenizer_path, cut, 2, 2, 1), ranks=8)
    return whole, cut, resumed


def _assert_bitwise_continuation(whole, cut, resumed, from_step=10):
    assert "resumed from" in resumed.stderr and f"step_{from_step:08d} at step {from_step}" in resumed.stderr
    rows, ok = compare(load_losses(whole), load_losses(cut), rtol=0.0)
    assert len(rows) == STEPS and ok, rows
    # metrics.jsonl holds each step once, although the killed run had logged steps past its checkpoint.
    losses = [r["step"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r]
    assert losses == list(range(1, STEPS + 1))
    _assert_no_pickle(cut / "checkpoints")


def _assert_no_pickle(root):
    """Every file of every checkpoint is JSON or safetensors (nothing that unpickles), and nothing else is there."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "latest" and ".partial" not in str(p)]
    assert files
    for path in files:  # each one read as what its name says, by readers that never unpickle
        assert path.suffix in (".json", ".safetensors"), path
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            SafetensorsFile(path)


def test_exact_resume_3d_layout(runs_3d):
    _assert_bitwise_continuation(*runs_3d)


@pytest.mark.parametrize("tp,pp,zero,ranks,precision", [(1, 1, 1, 2, "auto"), (1, 1, 2, 2, "auto"),
                                                         (1, 1, 3, 2, "auto"), (2, 2, 1, 4, "auto"),
                                                         (1, 1, 1, 2, "bf16")],
                         ids=["dp2-zero1", "dp2-zero2", "dp2-zero3", "tp2-pp2", "dp2-zero1-bf16"])
def test_exact_resume(tmp_path, corpus, tokenizer_path, tp, pp, zero, ranks, precision):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    recipes = [_recipe(tmp_path, corpus, tokenizer_path, run, tp, pp, zero, precision=precision)
               for run in (whole, cut)]
    resumed = _whole_and_killed_then_resumed(*recipes, ranks)
    _assert_bitwise_continuation(whole, cut, resumed)
    if precision == "bf16":  # bf16 trains from fp32 master weights: the checkpoint holds those and fp32 moments
        for path in (cut / "checkpoints" / "step_00000020" / "model").glob("*.safetensors"):
            file = SafetensorsFile(path)
            assert {str(file.read(k).dtype) for k in file.keys()} == {"torch.float32"}, path


MOVES = [(1, 1, 2, 3), (1, 2, 1, 1), (2, 1, 1, 0)]


@pytest.fixture(scope="module")
def moved(runs_3d, tmp_path_factory, corpus, tokenizer_path):
    """The 3D run's step-10 checkpoint resumed in each of MOVES (launched two at a time)."""
    _, cut, _ = runs_3d
    checkpoint = cut / "checkpoints" / "step_00000010"
    tmp = tmp_path_factory.mktemp("moved")
    calls, runs = [], []
    for tp, pp, dp, zero in MOVES:
        run = tmp / f"tp{tp}-pp{pp}-dp{dp}-zero{zero}"
        recipe = write_recipe(tmp / f"{run.name}.yaml", corpus, tokenizer_path, run, train=TRAIN,
                              parallel={"tp": tp, "pp": pp, "zero_stage": zero})
        calls.append((recipe, [f"resume={checkpoint}"], tp * pp * dp, None))
        runs.append(run)
    # And the one-rank run of the same recipe from scratch: what the 8-rank layout must equal.
    one = tmp / "tp1-pp1-dp1-zero0"
    calls.append((write_recipe(tmp / "one.yaml", corpus, tokenizer_path, one, train=TRAIN), [], 1, None))
    runs.append(one)
    return {layout: (run, proc) for layout, run, proc in zip([*MOVES, (1, 1, 1, 0)], runs, launch_pair(*calls))}


def test_3d_layout_trains_the_same_model_as_one_rank(runs_3d, moved):
    """tp 2 x pp 2 x dp 2 (8 ranks), uninterrupted, against one rank on the same data and seed: every step's loss to
    1e-4 (the layout grid of test_layouts.py stops at 4 ranks)."""
    whole, _, _ = runs_3d
    run, proc = moved[(1, 1, 1, 0)]
    assert_ok(proc)
    rows, ok = compare(load_losses(run), load_losses(whole), rtol=1e-4)
    assert len(rows) == STEPS and ok, rows


@pytest.mark.parametrize("tp,pp,dp,zero", MOVES)
def test_resume_in_another_layout(tp, pp, dp, zero, runs_3d, moved):
    whole, _, _ = runs_3d
    run, proc = moved[(tp, pp, dp, zero)]
    assert_ok(proc)
    assert "layout changed" in proc.stderr
    reference, losses = load_losses(whole), load_losses(run)
    assert sorted(losses) == list(range(11, STEPS + 1))
    assert losses[11] == pytest.approx(reference[11], rel=1e-4)
    for step in range(12, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-3), step


def test_kill_during_the_background_write_keeps_the_previous_checkpoint(tmp_path, corpus, tokenizer_path):
    """Rank 1 is killed while its files of step 10's checkpoint are being written in the background and training
    goes on (a save every 5 steps): step 10 never becomes a checkpoint, `latest` stays at step 5, and the resume from
    there is bitwise the uninterrupted run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole_recipe = _recipe(tmp_path, corpus, tokenizer_path, whole, 1, 1, 1)
    cut_recipe = _recipe(tmp_path, corpus, tokenizer_path, cut, 1, 1, 1, every=5)
    done, torn = launch_pair((whole_recipe, [], 2, None),
                             (cut_recipe, [], 2, {"GPTDIST_FAULTS": "kill-during-write@10:rank=1"}))
    assert_ok(done)
    assert torn.returncode != 0
    assert not (cut / "checkpoints" / "step_00000010").exists()
    assert (cut / "checkpoints" / "step_00000010.partial").is_dir()
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    resumed = launch(cut_recipe, ranks=2)
    assert_ok(resumed)
    _assert_bitwise_continuation(whole, cut, resumed, from_step=5)
    assert not list((cut / "checkpoints").glob("*.partial"))
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000020"
