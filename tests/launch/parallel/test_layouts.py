"""Every tensor x pipeline x data-parallel layout trains the same model as one rank, and each rank holds only its
share of it, as `gptdist plan` predicts. Real launches of launch/train.sh (the deepspeed launcher) on CPU ranks.

The grid: 12 layouts over tp {1, 2}, pp {1, 2, 4}, ZeRO {0, 1, 2, 3}, dp up to 4 and activation checkpointing (up to
4 ranks; test_resume.py runs tp 2 x pp 2 x dp 2 on 8), of an 8-block model whose blocks hold 96% of its parameters
(d_model 128). For each, with the same data, seed and global batch:

* per-step losses equal the one-rank run's to 1e-4 over 6 steps (the user-facing `compare-loss` logic), and the
  gradient norm, computed over the whole model in every layout, to 1e-3;
* every rank's measured model-state bytes (its memory report) equal the planner's prediction for its stage and
  data-parallel rank within 2%, and its peak of live tensor bytes through step 2 the predicted peak within 15%.

Scaling, measured from outside the processes (VmHWM in /proc/PID/status) on the same model with d_model 768
(57 M parameters, about 1 GiB of live tensors at one rank against the ~0.55 GiB the runtime takes per rank), minus
the same layout of the grid's d_model 128 model, so that Python, torch and DeepSpeed cancel: the largest rank holds at
most 0.35 of the one-rank run at pp=4 and at tp=2 x pp=2, and at most 0.45 at ZeRO-3 with dp=4, also while resuming
from a checkpoint the one-rank run saved.

Launches run two at a time: a launch is mostly single-threaded start-up, so two share the 2 cores well.
"""

from __future__ import annotations

import contextlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptdist.cli import main
from gptdist.plan.measure import run_layout
from gptdist.telemetry.metrics_file import read_metrics
from gptdist.tools.compare_loss import compare, load_losses
from tests.helpers import cpu_env, write_recipe

SMALL = {"n_layer": 8, "n_head": 8, "d_model": 128, "vocab_size": 512, "seq_len": 32}
BIG = {**SMALL, "d_model": 768}
STEPS = 6
# micro-batch 1 x global 8: 8 micro-batches per step at dp=1 (the pipeline's micro-batches), 2 at dp=4.
ZERO = [(1, 1, 2, 1, False), (1, 1, 2, 2, False), (1, 1, 2, 3, False)]  # their checkpoints are read back
TRAIN = {"steps": STEPS, "micro_batch_size": 1, "global_batch_size": 8, "log_every": 5, "warmup_steps": 2}
GRID = [  # (tp, pp, dp, zero, activation checkpointing); 4 ranks at most, so the grid fits a CI machine's time
    (1, 1, 1, 0, False), (1, 1, 2, 0, False), (1, 1, 2, 1, False), (1, 1, 2, 2, False), (1, 1, 2, 3, False),
    (1, 1, 4, 3, False), (2, 1, 1, 0, False), (2, 1, 2, 3, False), (1, 2, 1, 0, False), (1, 2, 2, 1, True),
    (1, 4, 1, 0, False), (2, 2, 1, 0, False),
]
ONE = GRID[0]
SCALING = {(1, 4, 1, 0, False): 0.35, (2, 2, 1, 0, False): 0.35, (1, 1, 4, 3, False): 0.45}
TRACKED = (1, 1, 2, 1, False)  # the layout whose MLflow run is read back
ENV = cpu_env()


def _name(layout, tag=""):
    tp, pp, dp, z, ac = layout
    return f"tp{tp}-pp{pp}-dp{dp}-zero{z}{'-ac' if ac else ''}{tag}"


def _ranks(layout):
    return layout[0] * layout[1] * layout[2]


def _parallel(layout):
    tp, pp, _, z, ac = layout
    return {"tp": tp, "pp": pp, "zero_stage": z, "activation_checkpointing": ac}


def _run_all(jobs):
    """[(key, recipe, overrides, ranks, run_dir)] -> {key: Measured}, two launches at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(run_layout, str(recipe), overrides, ranks, run_dir, env=ENV)
                   for key, recipe, overrides, ranks, run_dir in jobs}
        return {key: f.result() for key, f in futures.items()}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def grid(tmp, corpus, tokenizer_path):
    jobs = []
    for layout in GRID:
        recipe = write_recipe(tmp / f"{_name(layout)}.yaml", corpus, tokenizer_path, tmp / _name(layout),
                              model=SMALL, train=TRAIN, parallel=_parallel(layout),
                              tracking={"enabled": layout == TRACKED}, checkpoint={"at_end": layout in ZERO})
        jobs.append((layout, recipe, [], _ranks(layout), tmp / _name(layout)))
    return _run_all(jobs)


@pytest.fixture(scope="module")
def predictions(tmp, corpus, tokenizer_path):
    """gptdist plan's JSON for the grid's model at every world size of the grid, by layout."""
    recipe = write_recipe(tmp / "plan.yaml", corpus, tokenizer_path, tmp / "unused", model=SMALL, train=TRAIN)
    out = {}
    for world in sorted({_ranks(layout) for layout in GRID}):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["plan", str(recipe), "--gpus", str(world), "--hardware", "cpu", "--json"]) == 0
        for entry in json.loads(buf.getvalue()):
            if entry["micro_batch_size"] == TRAIN["micro_batch_size"]:
                out[(entry["tp"], entry["pp"], entry["dp"], entry["zero_stage"],
                     entry["activation_checkpointing"])] = entry
    return out


def _steps(run_dir):
    """The training steps' records of metrics.jsonl (not the validation's or the checkpoints')."""
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_every_layout_trains_the_same_model(grid):
    reference = grid[ONE]
    assert reference.ok, reference.error
    ref_norms = {r["step"]: r["grad_norm"] for r in _steps(reference.run_dir)}
    for layout, run in grid.items():
        assert run.ok, f"{_name(layout)}: {run.error}"
        records = _steps(run.run_dir)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), _name(layout)
        rows, ok = compare(load_losses(reference.run_dir), load_losses(run.run_dir), rtol=1e-4)
        assert len(rows) == STEPS and ok, (_name(layout), rows)
        for record in records:
            assert record["grad_norm"] == pytest.approx(ref_norms[record["step"]], rel=1e-3), _name(layout)
        for key in ("loss", "lr", "tokens", "tokens_per_s"):
            assert all(r[key] is not None for r in records), key
        assert records[-1]["tokens"] == STEPS * TRAIN["global_batch_size"] * SMALL["seq_len"]
        # Rank 0 alone reports progress: no other rank's start-up chatter reaches the log.
        log = (run.run_dir.parent / f"{run.run_dir.name}.log").read_text()
        assert "[Rank 1]" not in log and "[rank1]" not in log.lower(), _name(layout)


def test_zero_layouts_save_their_sharded_checkpoint_and_track_the_run(grid):
    for layout in ZERO:
        run = grid[layout].run_dir
        ckpt = run / "checkpoints"
        assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:08d}"
        # One file of weight and Adam fragments per rank, each holding what that rank's optimizer owns.
        assert len(list((ckpt / f"step_{STEPS:08d}" / "model").glob("rank*.safetensors"))) == 2
        assert json.loads((run / "run_complete.json").read_text())["steps"] == STEPS
    _check_mlflow(grid[TRACKED].run_dir)


def _check_mlflow(run):
    from mlflow.tracking import MlflowClient

    records = _steps(run)
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    complete = json.loads((run / "run_complete.json").read_text())
    mlrun = client.get_run(complete["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.steps"] == str(STEPS)
    assert mlrun.data.params["parallel.zero_stage"] == "1"
    assert mlrun.data.params["model.d_model"] == str(SMALL["d_model"])
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    by_step = {m.step: m.value for m in history}
    for record in records:
        assert by_step[record["step"]] == pytest.approx(record["loss"], rel=1e-12)
    artifacts = [a.path for a in client.list_artifacts(mlrun.info.run_id)]
    assert "config.yaml" in artifacts
    # The memory summary of step 2, from rank 0: the largest and smallest rank of each figure.
    for key in ("model_states", "peak_live", "peak_rss"):
        history = client.get_metric_history(mlrun.info.run_id, f"memory/{key}_max_bytes")
        assert [m.step for m in history] == [2] and history[0].value > 0, key


def test_every_rank_holds_what_the_plan_predicts(grid, predictions):
    assert len(GRID) >= 12
    for layout, run in grid.items():
        assert run.ok, f"{_name(layout)}: {run.error}"
        assert sorted(run.reports) == list(range(_ranks(layout)))
        predicted = {(r["stage"], r["dp_rank"]): r for r in predictions[layout]["ranks"]}
        for rank, report in run.reports.items():
            # ZeRO-1/2 data-parallel ranks are predicted one by one; otherwise they all hold the same.
            want = predicted.get((report["pp_rank"], report["dp_rank"])) or predicted[(report["pp_rank"], 0)]
            where = f"{_name(layout)} rank {rank} (stage {report['pp_rank']}, dp rank {report['dp_rank']})"
            assert report["model_state_bytes"] == pytest.approx(want["model_state_bytes"], rel=0.02), where
            # Through the memory step: training's steady state, before the checkpoint saved at the end.
            peak = report["snapshots"][f"step_{report['memory_step']}"]["peak_live_bytes"]
            assert peak == pytest.approx(want["peak_bytes"], rel=0.15), where
            # The report's own bookkeeping: at the optimizer step the live bytes the allocator counted are the
            # model states the report found, plus at most a pipeline's activation buffers. Without ZeRO, DeepSpeed
            # all-reduces a flat copy of the gradients; gloo's worker thread can hold it a moment after the
            # all-reduce returns, so one gradient copy may still be counted then.
            snap = report["snapshots"]["optimizer_step"]
            in_flight = sum(snap["by_kind"]["grads"].values()) if layout[2] > 1 and layout[3] == 0 else 0
            most = 1.02 * snap["model_state_bytes"] + in_flight + 2**19
            assert snap["model_state_bytes"] <= snap["live_bytes"] <= most, where


@pytest.fixture(scope="module")
def big(tmp, corpus, tokenizer_path, grid):
    """The scaling layouts on the d_model 768 model; then each resumed from the one-rank run's checkpoint."""
    def recipe(layout, tag, **extra):
        # Only the one-rank run's checkpoint is read (by the resumes); the others save nothing.
        return write_recipe(tmp / f"{_name(layout, tag)}.yaml", corpus, tokenizer_path, tmp / _name(layout, tag),
                            model=BIG, train={**TRAIN, "steps": 2, **extra}, parallel=_parallel(layout),
                            checkpoint={"at_end": layout == ONE and tag == "-big"})

    layouts = [ONE, *SCALING]
    runs = _run_all([(lay, recipe(lay, "-big"), [], _ranks(lay), tmp / _name(lay, "-big")) for lay in layouts])
    saved = tmp / _name(ONE, "-big") / "checkpoints" / "step_00000002"
    resumed = _run_all([(lay, recipe(lay, "-resumed", steps=3), [f"resume={saved}"], _ranks(lay),
                         tmp / _name(lay, "-resumed")) for lay in SCALING])
    return runs, resumed


def _held(big_run, small_run) -> dict:
    """Per rank: VmHWM of the d_model 768 run minus that of the d_model 128 run of the same layout."""
    assert big_run.ok and small_run.ok, big_run.error or small_run.error
    assert sorted(big_run.vm_hwm) == sorted(small_run.vm_hwm) == sorted(big_run.reports), (big_run.vm_hwm,
                                                                                           small_run.vm_hwm)
    return {r: big_run.vm_hwm[r] - small_run.vm_hwm[r] for r in big_run.vm_hwm}


def test_memory_falls_with_the_layout_measured_from_outside(big, grid):
    runs, _ = big
    one = _held(runs[ONE], grid[ONE])[0]
    assert one > 0.8 * 2**30, one  # the one-rank run's model really stands above the runtime
    for layout, limit in SCALING.items():
        held = _held(runs[layout], grid[layout])
        assert max(held.values()) <= limit * one, (_name(layout), {r: round(v / one, 3) for r, v in held.items()})


def test_memory_falls_with_the_layout_while_resuming_from_another_layout(big, grid):
    runs, resumed = big
    one = _held(runs[ONE], grid[ONE])[0]
    for layout, limit in SCALING.items():
        run = resumed[layout]
        log = (run.run_dir.parent / f"{run.run_dir.name}.log").read_text()
        assert "resumed from" in log and "layout changed" in log, log[-2000:]
        held = _held(run, grid[layout])
        assert max(held.values()) <= limit * one, (_name(layout), {r: round(v / one, 3) for r, v in held.items()})
