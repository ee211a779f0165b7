"""run.dir's lock, without training: a live holder refuses another job in one line naming it; a holder whose process
is gone (this host), whose lease expired (any host) or that is this very job (a requeue) is taken over. Two jobs
starting together: exactly one holds it. A holder whose lapsed lease was taken over knows it lost it, and neither
saves nor prunes."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from gptdist.errors import UserError
from gptdist.train.run_lock import LEASE_S, LOCK_FILE, RunLock, job_identity


def _plant(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"job": "slurm job 77", "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
              "lease_until": time.time() + 600, **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    renewed = min(time.time(), holder["lease_until"] - LEASE_S)  # the file's time: when its lease was last renewed
    os.utime(run_dir / LOCK_FILE, (renewed, renewed))
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


@pytest.mark.parametrize("before", ["no lock", "a stale lock", "a torn lock"])
def test_two_jobs_starting_together_exactly_one_holds_the_lock(tmp_path, monkeypatch, before):
    if before == "a stale lock":
        _plant(tmp_path, host="node-elsewhere", pid=1, lease_until=time.time() - 1)
    elif before == "a torn lock":
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / LOCK_FILE).write_text('{"job": "slurm job 5", "ho')
    barrier = threading.Barrier(2)
    checked = RunLock.check

    def check_then_wait(self):  # both have seen the lock free (or stale) before either takes it
        checked(self)
        barrier.wait(timeout=20)

    monkeypatch.setattr(RunLock, "check", check_then_wait)
    results = {}

    def start(job):
        lock = RunLock(tmp_path, env={"SLURM_JOB_ID": job})
        try:
            lock.acquire(lambda m: None)
            results[job] = lock
        except UserError as exc:
            results[job] = exc

    threads = [threading.Thread(target=start, args=(job,)) for job in ("1", "2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results.values() if isinstance(r, RunLock)]
    losers = [str(r) for r in results.values() if isinstance(r, UserError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert f"in use by {winners[0].job}" in losers[0] and "\n" not in losers[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == winners[0].job
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # no record or stale copy left beside it
    winners[0].release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lapsed_lease_taken_over_is_lost_and_the_checkpointer_neither_saves_nor_prunes(tmp_path, monkeypatch):
    from gptdist.checkpoint import checkpointer as module
    from gptdist.checkpoint.checkpointer import Checkpointer
    from gptdist.train.outcome import lock_lost
    from gptdist.train.stop import StopRequest

    first = RunLock(tmp_path, env={"SLURM_JOB_ID": "1"})
    first.acquire(lambda m: None)
    first.renew()
    assert first.lost is None  # renewing its own lock
    # As if this process were stopped past its lease: the lease lapses and another job takes the run directory.
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    (tmp_path / LOCK_FILE).write_text(json.dumps(dict(record, lease_until=time.time() - 1)))
    os.utime(tmp_path / LOCK_FILE, (time.time() - LEASE_S - 1,) * 2)
    second = RunLock(tmp_path, env={"SLURM_JOB_ID": "2"})
    second.acquire(lambda m: None)
    first.renew()
    line = first.lost
    assert "taken over by slurm job 2" in line and f"pid {os.getpid()}" in line and "\n" not in line
    first.renew()  # no longer renews: the lock stays the other job's
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == second.mine["token"]

    # The checkpointer asks before a save starts and before one is sealed (the seal prunes): neither happens.
    errors = []
    cfg = SimpleNamespace(run=SimpleNamespace(dir=str(tmp_path)),
                          checkpoint=SimpleNamespace(max_failed_saves=3, keep=1))
    world = SimpleNamespace(size=1, rank=0, is_main=True)
    ckpt = Checkpointer(cfg, SimpleNamespace(world=world, layout=SimpleNamespace(tp=1)), [],
                        SimpleNamespace(error=errors.append, warn=errors.append, info=lambda m: None), None)
    ckpt.disowned = lambda: first.lost
    monkeypatch.setattr(module, "commit", lambda *a, **k: pytest.fail("sealed (and pruned) a run.dir not ours"))
    assert ckpt.save(7) is False
    assert not (tmp_path / "checkpoints").exists() and ckpt.last.problem == line and "taken over" in errors[0]
    result = SimpleNamespace(blocking_s=0.0, write_s=0.0, nbytes=1)
    ckpt._in_flight = SimpleNamespace(wait=lambda *a: None, result=result, snapshot=SimpleNamespace(step=8))
    assert ckpt.close().problem == line

    # The run stops at its next step, every rank agreeing, with one line naming the new holder, exit 5, no record.
    stop = StopRequest(1, lambda: first.lost)
    assert stop.agreed(None) and stop.lost
    ending = lock_lost(8, stop.disowned())
    assert ending.exit_code == 5 and ending.failed and ending.record(None) is None and "slurm job 2" in ending.message
    first.release()  # leaves the other job's lock alone
    assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == "slurm job 2"
    second.release()


def test_a_single_node_launch_on_another_host_is_another_job(monkeypatch):
    identities = {}
    for host in ("node-a", "node-b"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        for addr in ("localhost", "127.0.0.1", "127.0.1.1", "::1", None, "10.1.2.3"):
            env = {"MASTER_PORT": "29500", "WORLD_SIZE": "2", **({"MASTER_ADDR": addr} if addr else {})}
            identities[host, addr] = job_identity(env)
    for addr in ("localhost", "127.0.0.1", "127.0.1.1", "::1", None):
        assert identities["node-a", addr] != identities["node-b", addr] and "node-a" in identities["node-a", addr]
    # A routable rendezvous address is shared by every node of one job: the same job on each.
    assert identities["node-a", "10.1.2.3"] == identities["node-b", "10.1.2.3"] == "launch at 10.1.2.3:29500"


def test_renewal_moves_the_lock_file_time_and_never_writes_the_record(tmp_path):
    """The lease is renewed by touching the file this job linked, so a renewal racing a take-over can never replace
    the new holder's record; a reader on another host takes the file's time as the renewal."""
    lock = RunLock(tmp_path, env={"SLURM_JOB_ID": "1"})
    lock.acquire(lambda m: None)
    path = tmp_path / LOCK_FILE
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, host="node-elsewhere", lease_until=time.time() - 1)))  # the same file
    os.utime(path, (time.time() - LEASE_S - 1,) * 2)  # as if the last renewal were past the lease
    other = RunLock(tmp_path, env={"SLURM_JOB_ID": "2"})
    assert other.stale_because(other.holder()) == "its lease expired"
    before = path.read_bytes()
    lock.renew()
    assert lock.lost is None and path.read_bytes() == before
    assert other.stale_because(other.holder()) is None
    with pytest.raises(UserError, match="is in use by slurm job 1"):
        other.acquire(lambda m: None)
    lock.release()
    assert not path.exists()


def test_a_renewal_racing_a_take_over_touches_nothing_of_the_new_holder(tmp_path, monkeypatch):
    """The take-over lands between the renewal's check (the lock's name still leads to this job's file) and its touch:
    the touch goes to this job's own file, through its descriptor, so the new holder's lease is not extended."""
    first = RunLock(tmp_path, env={"SLURM_JOB_ID": "1"})
    first.acquire(lambda m: None)
    path = tmp_path / LOCK_FILE
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, lease_until=time.time() - 1)))  # the lease lapsed
    os.utime(path, (time.time() - LEASE_S - 1,) * 2)
    second = RunLock(tmp_path, env={"SLURM_JOB_ID": "2"})
    checked = first._identity()

    def take_over_after_the_check():
        second.acquire(lambda m: None)
        os.utime(path, (time.time() - 100,) * 2)  # the new holder's file, 100 s old: a touch would move it on
        return checked

    monkeypatch.setattr(first, "_identity", take_over_after_the_check)
    first.renew()
    monkeypatch.undo()
    assert abs(os.stat(path).st_mtime - (time.time() - 100)) < 5  # untouched
    assert json.loads(path.read_text())["job"] == "slurm job 2"
    first.renew()  # the next renewal finds it out
    assert "taken over by slurm job 2" in first.lost
    first.release()
    second.release()
    assert not path.exists()
