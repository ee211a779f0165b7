"""A time-out of `plan --measure` or `bench parallel` stops the launcher's whole process group: the ranks it
started end with it instead of living on (both run their launches through launchers/child.run_group)."""

import inspect
import os
import time

from gptdist.launchers.child import run_group


def test_timeout_kills_the_grandchildren_too(tmp_path):
    pid_file = tmp_path / "rank.pid"
    # A "launcher" that starts a long-lived "rank" and waits for it, as the deepspeed launcher does.
    cmd = ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"]
    started = time.monotonic()
    assert run_group(cmd, cwd=tmp_path, env=dict(os.environ), log=tmp_path / "log.txt", timeout=1, grace_s=2) is None
    assert time.monotonic() - started < 30
    rank = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(rank, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{rank}/stat") as fh:  # a zombie waiting for its reaper counts as gone
            if fh.read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the rank {rank} outlived the time-out")


def test_measure_and_bench_launch_through_the_group():
    from gptdist.bench import parallel
    from gptdist.plan import measure

    for module in (measure, parallel):
        source = inspect.getsource(module)
        assert "run_group(" in source and "subprocess.run(" not in source, module.__name__
