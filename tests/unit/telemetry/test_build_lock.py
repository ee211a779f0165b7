"""The memory counter's build never waits without bound: a stale torch lock is cleared, a held build lock is waited
for a bounded time and then named."""

import subprocess
import sys
import time

from gptdist.telemetry import live_bytes


def test_stale_torch_lock_is_removed_under_the_build_lock(tmp_path):
    (tmp_path / "lock").write_text("")
    with live_bytes._BuildLock(tmp_path, wait_s=1) as held:
        assert held
        live_bytes._clear_stale_torch_lock(tmp_path)
    assert not (tmp_path / "lock").exists()


def test_a_held_build_lock_is_waited_for_a_bounded_time(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / 'gptdist-build.flock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with live_bytes._BuildLock(tmp_path, wait_s=1.0) as held:
            assert not held
        assert 0.9 <= time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    # The holder killed, the kernel released its lock: the next build goes ahead at once.
    with live_bytes._BuildLock(tmp_path, wait_s=0) as held:
        assert held


def test_the_counter_is_removed_once_measuring_is_over():
    counter = live_bytes.LiveBytes("cpu")
    if not counter.available:  # no compiler on this machine: nothing installed, nothing to remove
        return
    import torch

    before = counter.read()[0]
    kept = torch.empty(2**20, dtype=torch.uint8)  # counted: made while installed
    assert counter.read()[0] - before >= 2**20
    counter.stop()
    assert counter.stopped
    live_after_stop = counter._ext.stats()[0]
    fresh = torch.empty(2**20, dtype=torch.uint8)  # not counted: the process's own allocator again
    assert counter._ext.stats()[0] == live_after_stop
    del kept  # a tensor the counter made is still counted when it goes
    assert counter._ext.stats()[0] == live_after_stop - 2**20
    del fresh
