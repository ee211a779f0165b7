"""Shared-memory files: what a killed run left is removed at the next start, what a live process uses is kept."""

import mmap
import os
import subprocess
import sys

from gptdist.engine.shm import clear_stale_shm, paths_in_use


def test_stale_files_go_and_files_in_use_stay(tmp_path):
    folder = str(tmp_path)
    stale = tmp_path / "deepspeed_allreduce_buffer_0_29500_0"
    mapped = tmp_path / "deepspeed_allreduce_buffer_0_29500_1"
    opened = tmp_path / "deepspeed_allreduce_buffer_0_29500_2"
    other = tmp_path / "someone_elses_segment"
    for path in (stale, mapped, opened, other):
        path.write_bytes(b"\0" * 4096)
    # A live process that maps one file and holds another open, as a running rank would.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, os, sys, time\n"
        f"f = open({str(mapped)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096); f.close()\n"
        f"g = open({str(opened)!r}, 'rb')\n"
        "print('ready', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert {str(mapped), str(opened)} <= paths_in_use(folder)
        removed = clear_stale_shm(folder=folder)
        assert removed == [str(stale)]
        assert not stale.exists() and mapped.exists() and opened.exists() and other.exists()
    finally:
        holder.kill()
        holder.wait()
    # Its owner gone, the mapped file is stale too.
    assert sorted(clear_stale_shm(folder=folder)) == [str(mapped), str(opened)]
    assert other.exists()


def test_a_mapping_of_this_process_counts_as_in_use(tmp_path):
    path = tmp_path / "deepspeed_allreduce_buffer_x_1_0"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as fh:
        view = mmap.mmap(fh.fileno(), 4096)
    try:
        assert clear_stale_shm(folder=str(tmp_path)) == []
    finally:
        view.close()
    assert clear_stale_shm(folder=str(tmp_path)) == [str(path)]
    assert not os.path.exists(path)
