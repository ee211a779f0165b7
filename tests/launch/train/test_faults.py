"""Faults under the real launcher on CPU: a dead rank, NaN losses, a run that does not recover, and SIGTERM."""

import json
import re
import signal
import subprocess
import time

import pytest

from gptdist.checkpoint.manifest import checksum_problems, read_manifest, size_problems
from gptdist.telemetry.metrics_file import read_metrics
from gptdist.tools.compare_loss import compare, load_losses
from tests.helpers import ROOT, assert_ok, cpu_env, launch, train_single, write_recipe


def test_dead_rank_ends_the_job(tmp_path, corpus, tokenizer_path):
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, tmp_path / "run", train={"steps": 100000})
    start = time.monotonic()
    proc = launch(recipe, ranks=2, env={"GPTDIST_FAULTS": "kill@5:rank=1"}, timeout=240)
    assert proc.returncode != 0
    # Start-up is most of this; the job must not wait out a collective timeout after the kill.
    assert time.monotonic() - start < 150
    assert not (tmp_path / "run" / "run_complete.json").exists()


def test_nan_loss_is_skipped_and_counted(tmp_path, corpus, tokenizer_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, train={"steps": 12, "log_every": 4},
                          parallel={"zero_stage": 1}, tracking={"enabled": True})
    assert_ok(launch(recipe, ranks=2, env={"GPTDIST_FAULTS": "nan-loss@5"}))
    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert records[5]["skipped"] and records[5]["loss"] is None and records[5]["bad_steps"] == 1
    assert all(records[s]["loss"] is not None and not records[s]["skipped"] for s in range(6, 13))
    assert records[12]["bad_steps"] == 1
    assert records[6]["lr"] == records[5]["lr"]  # the schedule held still for the skipped step

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = json.loads((run / "run_complete.json").read_text())["mlflow_run_id"]
    bad = {m.step: m.value for m in client.get_metric_history(run_id, "bad_steps")}
    assert bad[4] == 0 and bad[5] == 1 and bad[12] == 1


def test_too_many_bad_steps_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, tokenizer_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run,
                          train={"steps": 20, "max_bad_steps": 2}, checkpoint={"every": 2})
    proc = train_single(recipe, env={"GPTDIST_FAULTS": "nan-loss@3,nan-loss@4,nan-loss@5"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "2 consecutive steps had a non-finite loss" in proc.stderr
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000002"
    folder = run / "checkpoints" / latest
    manifest = read_manifest(folder)
    assert size_problems(folder, manifest) == []
    assert checksum_problems(folder, manifest, list(manifest["files"])) == []
    assert not (run / "checkpoints" / "step_00000004").exists()


def test_sigterm_saves_and_resume_continues_bitwise(tmp_path, corpus, tokenizer_path):
    train = {"steps": 300, "log_every": 5}
    whole = tmp_path / "whole"
    assert_ok(launch(write_recipe(tmp_path / "w.yaml", corpus, tokenizer_path, whole, train=train), ranks=2))
    cut = tmp_path / "cut"
    recipe = write_recipe(tmp_path / "c.yaml", corpus, tokenizer_path, cut, train=train)
    env = cpu_env({"GPUS_PER_NODE": "2"})
    proc = subprocess.Popen(["bash", "launch/train.sh", str(recipe)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (cut / "metrics.jsonl").exists() or not (cut / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be signalled"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads((cut / "stopped.json").read_text())
    assert stopped["signal"] == "SIGTERM" and 0 < stopped["step"] < 300
    assert (cut / "checkpoints" / "latest").read_text().strip() == f"step_{stopped['step']:08d}"
    assert_ok(launch(recipe, ranks=2))
    rows, ok = compare(load_losses(whole), load_losses(cut), rtol=0.0)
    assert len(rows) == 300 and ok, [r for r in rows if r[3] > 0][:5]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2.5 MB filesystem (tmpfs): room for one checkpoint of the tiny model (1.7 MB), not for two."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_keeps_the_previous_checkpoint_and_an_unsaved_end_is_not_complete(small_disk, tmp_path, corpus,
                                                                                    tokenizer_path):
    run = small_disk / "run"
    # The token cache elsewhere: the checkpoints are what fills this disk (a span of windows is tokenized ahead).
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, train={"steps": 12},
                          checkpoint={"every": 4}, data={"cache": str(tmp_path / "token_cache")})
    proc = train_single(recipe)
    # Step 8's save is refused before writing (no room for a second checkpoint); so is the final one, and a run
    # whose last checkpoint is missing is not complete: exit 4, no run_complete.json, so a scheduler runs it again.
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "checkpoint of step 8 not saved" in proc.stderr and "MB free" in proc.stderr
    assert "the checkpoint of step 12 that ends this run was not saved" in proc.stderr
    assert not (run / "run_complete.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    folder = run / "checkpoints" / "step_00000004"
    manifest = read_manifest(folder)
    assert checksum_problems(folder, manifest, list(manifest["files"])) == []
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == list(range(1, 13))
    # A second run on the same full disk: with no checkpoint of its own to size against, its saves start and fail
    # as they are written (no space left); after checkpoint.max_failed_saves of them in a row it stops.
    recipe = write_recipe(tmp_path / "r2.yaml", corpus, tokenizer_path, small_disk / "run2", train={"steps": 40},
                          checkpoint={"every": 2, "max_failed_saves": 2}, data={"cache": str(tmp_path / "token_cache")})
    proc = train_single(recipe)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "No space left on device" in proc.stderr
    # The second failure is known once its background write has failed: at step 4's save or a step after it.
    assert re.search(r"stopping at step [4-9]: 2 checkpoints in a row could not be saved", proc.stderr)
    assert not list((small_disk / "run2" / "checkpoints").glob("step_*"))
