"""`accelerate launch` across nodes: two machines on loopback (`--num_machines 2 --machine_rank 0|1 --same_network`)
train the same model as one deepspeed launcher with the same 4 ranks, bitwise; and on the local Slurm cluster
(slurm/local-cluster.sh, as in tests/launch/launchers/test_slurm.py) a 2-node job started through accelerate
(`sbatch slurm/train.sbatch --launcher accelerate`), stopped mid-run as before a time limit, saves, requeues itself,
resumes and completes with the losses of the uninterrupted run, in one MLflow run that records the launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptdist.telemetry.metrics_file import read_metrics
from tests.accelerate_helpers import accelerate_launch, open_recipe
from tests.helpers import ROOT, assert_ok, cpu_env, launch

# The local cluster and the MLflow server: the fixtures of tests/launch/launchers/conftest.py.
from tests.slurm_helpers import FINAL_STATES, _job, _tail, _wait

STEPS = 100  # ~10 s of training: long enough for the Slurm job to be stopped mid-run
# tp 2 x dp 2 on 2 machines x 2 ranks: tensor parallel inside a machine, data parallel across them.
LAYOUT = {"tp": 2, "pp": 1, "zero_stage": 1}
TRAIN = {"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 5}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bitwise_equal(a: Path, b: Path) -> None:
    verdict = subprocess.run([sys.executable, "-m", "gptdist.cli", "compare-loss", str(a), str(b), "--rtol", "0"],
                             cwd=ROOT, capture_output=True, text=True)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert f"MATCH: {STEPS} common steps" in verdict.stdout


@pytest.fixture(scope="module")
def loopback_run(tmp_path_factory, corpus, tokenizer_path):
    """Two `accelerate launch` processes, machine 0 and machine 1, meeting on 127.0.0.1: an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("loopback")
    run = tmp / "run"
    recipe = open_recipe(tmp / "r.yaml", corpus, tokenizer_path, run, unset=(), train=TRAIN, parallel=LAYOUT)
    port = str(_free_port())
    started = time.time()
    machines = [accelerate_launch(["--use_deepspeed", "--num_machines", "2", "--num_processes", "4",
                                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                   "--main_process_port", port, "--same_network",
                                   "--deepspeed_multinode_launcher", "standard"],
                                  recipe, hf_home=tmp / "hf", wait=False) for rank in (0, 1)]
    try:
        outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output[-6000:]
    return recipe, run, outputs, time.time() - started


def test_two_machines_on_loopback_equal_one_launcher_with_four_ranks(loopback_run, tmp_path):
    recipe, run, outputs, seconds = loopback_run
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == list(range(1, STEPS + 1))
    # Rank 0 is on machine 0: it alone reports.
    assert "gptdist | finished" in outputs[0] and "gptdist | finished" not in outputs[1]
    one_launcher = tmp_path / "one-launcher"
    started = time.time()
    assert_ok(launch(recipe, [f"run.dir={one_launcher}"], ranks=4))
    print(f"\naccelerate 2 machines x 2 ranks: {seconds:.0f} s; "
          f"deepspeed launcher, 4 ranks: {time.time() - started:.0f} s")
    # Same layout, same rank numbering (machine r holds ranks 2r, 2r+1), one thread per rank: bitwise equal.
    _bitwise_equal(one_launcher, run)


@pytest.mark.skipif(os.geteuid() != 0 or (shutil.which("slurmctld") is None and shutil.which("apt-get") is None),
                    reason="the local Slurm cluster needs root and either Slurm or apt-get to install it")
def test_slurm_job_through_accelerate_is_stopped_requeued_and_resumed_bitwise(
        cluster, mlflow_server, loopback_run, tmp_path, corpus, tokenizer_path):
    _, reference, _, _ = loopback_run
    run, log = tmp_path / "run", tmp_path / "job.log"
    recipe = open_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, unset=(), train=TRAIN, parallel=LAYOUT,
                         tracking={"enabled": True, "uri": mlflow_server, "experiment": "accelerate-preempt",
                                   "on_unreachable": "fail"})
    # The job inherits this environment: an empty HF_HOME, so no personal accelerate config is read.
    (tmp_path / "hf").mkdir()
    submit = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={log}", "slurm/train.sbatch",
                             "--launcher", "accelerate", str(recipe)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=cpu_env({"HF_HOME": str(tmp_path / "hf")}))
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    started = time.time()

    # Once training is under way, the warning Slurm sends before a time limit: USR1 to the batch shell.
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert _job(job).get("JobState") not in FINAL_STATES, _tail(log)
        assert time.time() < deadline, f"no progress within 600 s\n{_tail(log)}"
        time.sleep(0.2)
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True, timeout=60)
    assert signalled.returncode == 0, signalled.stderr

    info = _wait(job, log)
    print(f"\nSlurm job {job} through accelerate, stopped, requeued and resumed: {time.time() - started:.0f} s")
    text = log.read_text()
    # The job completes, on 2 nodes, each started by accelerate launch.
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", _tail(log)
    assert "launcher accelerate" in text
    assert "accelerate.sh: node 0 of 2, 2 ranks" in text and "accelerate.sh: node 1 of 2, 2 ranks" in text
    # Stopped mid-run, requeued, resumed from the checkpoint it saved.
    assert info["Restarts"] == "1" and "SLURM_RESTART_COUNT=1" in text and "requeueing job" in text, _tail(log)
    stopped_at = int(text.split("gptdist | stopped after step ")[1].split()[0])
    assert 0 < stopped_at < STEPS
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in text
    tag = f"step_{STEPS:08d}"
    assert (run / "checkpoints" / "latest").read_text().strip() == tag
    assert len(list((run / "checkpoints" / tag).glob("model/rank*.safetensors"))) == 4  # one file of fragments per rank

    # Every step once, and the losses of the run that was never stopped, bitwise.
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == list(range(1, STEPS + 1))
    _bitwise_equal(reference, run)

    # Both attempts wrote into one MLflow run, which names the launcher.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("accelerate-preempt").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    complete = json.loads((run / "run_complete.json").read_text())
    assert runs[0].info.run_id == complete["mlflow_run_id"] and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["gptdist.launcher"] == "accelerate"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    reference_losses = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl") if "loss" in r}
    assert {m.step: m.value for m in history} == reference_losses
