"""Resume: killed right after a checkpoint, a run continues exactly (bitwise) in the same layout, closely in any
other layout, and a save torn by a kill is detected and skipped. Real launches of launch/train.sh; kills are real
SIGKILLs injected with GPTDIST_FAULTS."""


import pytest

from gptdist.telemetry.metrics_file import read_metrics
from gptdist.tools.compare_loss import compare, load_losses
from tests.helpers import assert_ok, launch, launch_pair, write_recipe

STEPS = 20
TRAIN = {"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 5}


def _recipe(tmp, corpus, tokenizer_path, run, tp, pp, zero):
    return write_recipe(tmp / f"{run.name}.yaml", corpus, tokenizer_path, run, train=TRAIN,
                        parallel={"tp": tp, "pp": pp, "zero_stage": zero}, checkpoint={"every": 10})


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


def _assert_bitwise_continuation(whole, cut, resumed):
    assert "resumed from" in resumed.stderr and "step_00000010" in resumed.stderr
    rows, ok = compare(load_losses(whole), load_losses(cut), rtol=0.0)
    assert len(rows) == STEPS and ok, rows
    # metrics.jsonl holds each step once, although the killed run had logged steps past its checkpoint.
    assert [r["step"] for r in read_metrics(cut / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_exact_resume_3d_layout(runs_3d):
    _assert_bitwise_continuation(*runs_3d)


def test_exact_resume_zero2(tmp_path, corpus, tokenizer_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    resumed = _whole_and_killed_then_resumed(_recipe(tmp_path, corpus, tokenizer_path, whole, 1, 1, 2),
                                             _recipe(tmp_path, corpus, tokenizer_path, cut, 1, 1, 2), ranks=2)
    _assert_bitwise_continuation(whole, cut, resumed)


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


def test_torn_save_is_skipped(tmp_path, corpus, tokenizer_path):
    run = tmp_path / "torn"
    recipe = _recipe(tmp_path, corpus, tokenizer_path, run, 1, 1, 1)
    # Rank 1 dies after writing its shards of step 20 and before the manifest: a torn checkpoint.
    torn = launch(recipe, ranks=2, env={"GPTDIST_FAULTS": "kill-during-save@20:rank=1"})
    assert torn.returncode != 0
    assert (run / "checkpoints" / "step_00000020").is_dir()
    assert not (run / "checkpoints" / "step_00000020" / "manifest.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    resumed = launch(recipe, ranks=2)
    assert_ok(resumed)
    assert "step_00000020 is incomplete" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step_00000010" in resumed.stderr
    assert (run / "checkpoints" / "step_00000020" / "manifest.json").exists()
