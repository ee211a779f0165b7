"""run.dir's lock, without training: a live holder refuses another job in one line naming it; a holder whose process
is gone (this host), whose lease expired (any host) or that is this very job (a requeue) is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gptdist.errors import UserError
from gptdist.train.run_lock import LOCK_FILE, RunLock


def _plant(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"job": "slurm job 77", "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
              "lease_until": time.time() + 600, **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    return holder


def test_a_live_holder_on_this_host_is_named_and_refuses(tmp_path):
    from gptdist.train.run_lock import _start_time

    _plant(tmp_path, started=_start_time(os.getpid()))
    lock = RunLock(tmp_path, env={"SLURM_JOB_ID": "78"})
    with pytest.raises(UserError) as err:
        lock.acquire(lambda m: None)
    line = str(err.value)
    assert "in use by slurm job 77" in line and f"pid {os.getpid()}" in line and LOCK_FILE in line and "\n" not in line


def test_a_dead_process_or_a_reused_pid_on_this_host_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    warnings = []
    _plant(tmp_path, pid=gone.pid, started="x")
    lock = RunLock(tmp_path, env={"SLURM_JOB_ID": "78"})
    lock.acquire(warnings.append)
    assert "taking over" in warnings[0] and "is gone" in warnings[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == "slurm job 78"
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    _plant(tmp_path, started="another boot:123")  # this process's pid, but not this process: a reused pid
    RunLock(tmp_path, env={"SLURM_JOB_ID": "78"}).acquire(warnings.append)
    assert "is gone" in warnings[1]


def test_another_host_holds_until_its_lease_expires(tmp_path):
    _plant(tmp_path, host="node-elsewhere", pid=1)
    with pytest.raises(UserError, match="host node-elsewhere"):
        RunLock(tmp_path, env={}).check()
    _plant(tmp_path, host="node-elsewhere", pid=1, lease_until=time.time() - 1)
    warnings = []
    RunLock(tmp_path, env={}).acquire(warnings.append)
    assert "lease expired" in warnings[0]


def test_the_same_job_takes_its_own_lock_back_and_check_only_reads(tmp_path):
    _plant(tmp_path, host="node-elsewhere", pid=1)
    warnings = []
    lock = RunLock(tmp_path, env={"SLURM_JOB_ID": "77"})  # the requeued attempt of the holder
    lock.acquire(warnings.append)
    assert warnings == []
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    RunLock(tmp_path / "fresh", env={}).check()
    assert not (tmp_path / "fresh").exists()  # checking creates nothing
