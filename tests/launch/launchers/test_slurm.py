"""slurm/train.sbatch on a real Slurm cluster (slurm/local-cluster.sh: one controller, two nodes on this machine),
tracked by a real MLflow server: a 2-node x 2-rank run completes with every step in metrics.jsonl, a sharded
checkpoint and MLflow; a run stopped mid-way (USR1, as before a time limit) saves, requeues itself, resumes and
ends with exactly the losses of the uninterrupted run, in one MLflow run.

Needs root (it installs Slurm with apt-get if missing and starts its daemons); skipped only where that is impossible.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

from gptdist.telemetry.metrics_file import read_metrics
from tests.helpers import ROOT, write_recipe
from tests.slurm_helpers import FINAL_STATES, NEEDS_SLURM, _job, _sh, _tail, _wait
from tests.tools_helpers import rewrite_state

pytestmark = [NEEDS_SLURM]

STEPS = 100  # ~10 s of training: long enough to be stopped mid-run, short enough for CI
SEED_STEP = 20  # the checkpoint of the complete run that seeds the stopped one (resume=PATH)
# 2 nodes x 2 ranks as tp 2 x dp 2: tensor parallel inside a node, data parallel across the nodes.
LAYOUT = {"tp": 2, "pp": 1, "zero_stage": 1}
TRAIN = {"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 5}










def _submit(recipe: Path, overrides, log: Path) -> str:
    proc = _sh("sbatch", "--parsable", "--nodes=2", f"--output={log}", "slurm/train.sbatch", str(recipe), *overrides)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]






def _recipe(tmp: Path, corpus, tokenizer_path, run_dir: Path, uri: str, experiment: str) -> Path:
    return write_recipe(tmp / "r.yaml", corpus, tokenizer_path, run_dir, train=TRAIN, parallel=LAYOUT,
                        tracking={"enabled": True, "uri": uri, "experiment": experiment, "on_unreachable": "fail"},
                        checkpoint={"every": SEED_STEP, "keep": 10})


def _mlflow_losses(uri: str, run_id: str, first: int = 1) -> Dict[int, float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(first, STEPS + 1)), f"MLflow loss steps: {sorted(steps)}"
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def complete_run(cluster, mlflow_server, tmp_path_factory, corpus, tokenizer_path):
    """An uninterrupted 2-node job; also the reference for the interrupted one."""
    tmp = tmp_path_factory.mktemp("complete")
    recipe = _recipe(tmp, corpus, tokenizer_path, tmp / "run", mlflow_server, "cluster-complete")
    log = tmp / "job.log"
    job = _submit(recipe, [], log)
    return job, _wait(job, log), tmp / "run", log


def test_two_node_job_completes(complete_run, mlflow_server):
    job, info, run, log = complete_run
    assert info["JobState"] == "COMPLETED", _tail(log)
    assert info["NumNodes"] == "2" and info["Restarts"] == "0"
    text = log.read_text()
    assert "node.sh: node 0 of 2 (node1 node2), 2 ranks" in text and "node.sh: node 1 of 2" in text
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # A checkpoint of the last step, complete (its manifest written last), one file of fragments per rank.
    tag = f"step_{STEPS:08d}"
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == tag
    assert (ckpt / tag / "manifest.json").is_file()
    assert len(list((ckpt / tag / "model").glob("rank*.safetensors"))) == 4
    complete = json.loads((run / "run_complete.json").read_text())
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=mlflow_server).get_run(complete["mlflow_run_id"]).info.status == "FINISHED"
    losses = _mlflow_losses(mlflow_server, complete["mlflow_run_id"])
    for record in records:
        assert losses[record["step"]] == pytest.approx(record["loss"], rel=1e-12)


def test_stopped_job_requeues_and_resumes_bitwise(complete_run, mlflow_server, tmp_path, corpus, tokenizer_path):
    """A job started with resume=PATH (the complete run's step-20 checkpoint, its MLflow run id removed so that this
    job tracks a run of its own), stopped mid-way by USR1 and requeued: the requeued attempt, given the same
    arguments, continues from its own checkpoint rather than from PATH, and ends with exactly the losses of the run
    that was never stopped."""
    _, reference_info, reference_run, _ = complete_run
    assert reference_info["JobState"] == "COMPLETED"
    seed = tmp_path / "seed" / f"step_{SEED_STEP:08d}"
    shutil.copytree(reference_run / "checkpoints" / seed.name, seed)
    rewrite_state(seed, lambda state: state.update(mlflow_run_id=None, tracking_uri=None))
    run, log = tmp_path / "run", tmp_path / "job.log"
    recipe = _recipe(tmp_path, corpus, tokenizer_path, run, mlflow_server, "cluster-preempt")
    job = _submit(recipe, [f"resume={seed}"], log)

    # Once training is under way, the warning Slurm sends before a time limit: USR1 to the batch shell.
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert _job(job).get("JobState") not in FINAL_STATES, _tail(log)
        assert time.time() < deadline, f"no progress within 600 s\n{_tail(log)}"
        time.sleep(0.2)
    signalled = _sh("scancel", "--signal=USR1", "--batch", job)
    assert signalled.returncode == 0, signalled.stderr

    info = _wait(job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", _tail(log)
    assert info["Restarts"] == "1", _tail(log)
    assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" in text
    assert "requeueing job" in text
    assert f"resumed from {seed} at step {SEED_STEP}" in text
    stopped_at = int(text.split("gptdist | stopped after step ")[1].split()[0])
    assert SEED_STEP < stopped_at < STEPS
    assert f"already holds its own checkpoints (newest step_{stopped_at:08d})" in text
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in text

    # One metrics.jsonl with every step after the seed once, and losses bitwise equal to the run never stopped.
    losses = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert losses == list(range(SEED_STEP + 1, STEPS + 1))
    verdict = subprocess.run([sys.executable, "-m", "gptdist.cli", "compare-loss", str(reference_run), str(run),
                              "--rtol", "0"], cwd=ROOT, capture_output=True, text=True)
    # compare-loss says MISMATCH for steps 1-20, which only the reference has; every common step is equal.
    assert f"{STEPS - SEED_STEP} common steps, max relative difference 0.00e+00" in verdict.stdout, verdict.stdout

    # Both attempts wrote into one MLflow run of this job's experiment.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("cluster-preempt")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    complete = json.loads((run / "run_complete.json").read_text())
    assert runs[0].info.run_id == complete["mlflow_run_id"] and runs[0].info.status == "FINISHED"
    reference_losses = {r["step"]: r["loss"] for r in read_metrics(reference_run / "metrics.jsonl")
                        if "loss" in r and r["step"] > SEED_STEP}
    assert _mlflow_losses(mlflow_server, runs[0].info.run_id, SEED_STEP + 1) == reference_losses
