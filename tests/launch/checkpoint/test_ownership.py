"""A run directory belongs to one job; restarts continue instead of rewinding; a torn metrics line does not block a
resume. Real runs of `gptdist train` (one process, and two ranks under the deepspeed launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from gptdist.telemetry.metrics_file import read_metrics
from gptdist.train.run_lock import LEASE_S, LOCK_FILE, RENEW_S
from tests.helpers import ROOT, assert_ok, cpu_env, launch, train_single, write_recipe


def _losses(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _paused_once_it_trains(recipe, run):
    """launch/train.sh with 2 ranks, paused (SIGSTOP to its whole process group) once metrics.jsonl has a line, so
    that it holds run.dir for as long as the test needs, however fast or slow the machine."""
    job = subprocess.Popen(["bash", "launch/train.sh", str(recipe)], cwd=ROOT, env=cpu_env({"GPUS_PER_NODE": "2"}),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before it trained"
            time.sleep(0.2)
    except BaseException:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise
    os.killpg(job.pid, signal.SIGSTOP)
    return job


def test_a_second_job_on_a_run_dir_in_use_is_refused_and_the_first_finishes(tmp_path, corpus, tokenizer_path):
    """The first job is paused (SIGSTOP to its whole process group) once it trains, so that it holds run.dir while
    the second one tries, however fast or slow the machine; it is resumed afterwards and must finish unharmed."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, train={"steps": 60, "log_every": 5},
                          checkpoint={"every": 20})
    first = _paused_once_it_trains(recipe, run)
    try:
        holder = json.loads((run / LOCK_FILE).read_text())
        seconds = []
        for attempt in (lambda: launch(recipe, ranks=2), lambda: train_single(recipe)):  # the script's check, a rank
            start = time.monotonic()
            second = attempt()
            seconds.append(time.monotonic() - start)
            assert second.returncode == 2, second.stderr[-3000:]
            line = [x for x in second.stderr.splitlines() if x.startswith("gptdist:")]
            assert len(line) == 1 and "is in use by" in line[0] and f"pid {holder['pid']}" in line[0], \
                second.stderr[-2000:]
        assert sum(seconds) < LEASE_S / 2  # the paused holder's lease never lapsed while the second job tried
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert (run / "run_complete.json").is_file() and _losses(run) == list(range(1, 61))
    assert not (run / LOCK_FILE).exists()


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, corpus, tokenizer_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, train={"steps": 2})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"job": "slurm job 5", "host": os.uname().nodename, "pid": gone.pid,
                                             "started": "x", "since": time.time(),
                                             "lease_until": time.time() + 600}))
    proc = train_single(recipe)
    assert_ok(proc)
    assert f"taking over {run / LOCK_FILE} from slurm job 5" in proc.stderr and "is gone" in proc.stderr


def test_resume_path_seeds_once_then_the_run_continues_from_its_own(tmp_path, corpus, tokenizer_path):
    """`resume=PATH` run twice, as a requeue would run the same command: the second time the run continues from its
    own newest checkpoint, not from PATH again."""
    seed = tmp_path / "seed"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, seed, train={"steps": 4})
    assert_ok(train_single(recipe))
    run = tmp_path / "run"
    args = [f"resume={seed}", f"run.dir={run}", "train.steps=10", "checkpoint.every=2"]
    killed = train_single(recipe, args, env={"GPTDIST_FAULTS": "kill-after-save@6"})
    assert killed.returncode != 0 and f"resumed from {seed / 'checkpoints' / 'step_00000004'}" in killed.stderr
    again = train_single(recipe, args)
    assert_ok(again)
    assert "already holds its own checkpoints (newest step_00000006)" in again.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_00000006'} at step 6" in again.stderr
    assert _losses(run) == list(range(5, 11))


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path, corpus, tokenizer_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, train={"steps": 4})
    assert_ok(train_single(recipe))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 5.1, "l')  # what a full disk leaves
    proc = train_single(recipe, ["train.steps=6"])
    assert_ok(proc)
    assert "dropped a torn last line" in proc.stderr
    assert _losses(run) == list(range(1, 7))


def test_a_run_whose_lock_is_taken_over_stops_without_saving_and_leaves_the_new_holder_alone(
        tmp_path, corpus, tokenizer_path):
    """A 2-rank job is paused, and while it is paused another job takes run.dir over the way a stale lock is taken
    (the old lock renamed aside, a record of its own linked to the lock's name). Resumed, the job finds it out at its
    next lease renewal (every RENEW_S) and every rank stops with exit 5 and one line naming the new holder, with no
    final save, no run_complete.json, and the new holder's lock in place."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, train={"steps": 100000, "log_every": 5},
                          checkpoint={"every": 100000})
    first = _paused_once_it_trains(recipe, run)
    try:
        lock = run / LOCK_FILE
        os.rename(lock, run / f"{LOCK_FILE}.stale")
        record = {"job": "slurm job 77", "host": "node-b", "pid": 4242, "started": "x", "since": time.time(),
                  "lease_until": time.time() + LEASE_S, "token": "new-holder"}
        (run / "new.tmp").write_text(json.dumps(record))
        os.link(run / "new.tmp", lock)
        os.killpg(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=RENEW_S + 120)
    finally:
        if first.poll() is None:  # a failure above: do not leave the job behind, paused or not
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    assert first.returncode == 5, err[-3000:]
    line = [x for x in err.splitlines() if "was taken over by slurm job 77 (host node-b, pid 4242)" in x]
    assert line and "stops without saving or pruning" in line[0], err[-3000:]
    assert json.loads(lock.read_text())["token"] == "new-holder"  # never removed nor rewritten by the old job
    assert not (run / "run_complete.json").exists()
    assert not list(run.glob("checkpoints/step_*"))  # neither the final save nor any other
