"""`slurm/local-cluster.sh down` stops only the daemons it started: a stale pid file whose number now belongs to an
unrelated process kills nothing (the process's /proc/PID/comm is checked), and /etc/hosts is touched only when its
own `up` added the line. Run against pid files in a folder of the test's own (LOCAL_SLURM_RUN_DIR), so that a real
local cluster on this machine is left alone."""

import os
import subprocess
import time

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="local-cluster.sh needs root")


def test_down_leaves_an_unrelated_process_named_by_a_stale_pid_file_alive(tmp_path):
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        run = tmp_path / "run"
        (run / "munge").mkdir(parents=True)
        for name in ("slurmctld.pid", "slurmd-node1.pid", "slurmd-node2.pid", "munge/munged.pid"):
            (run / name).write_text(f"{bystander.pid}\n")
        hosts = open("/etc/hosts", "rb").read()
        proc = subprocess.run(["bash", "slurm/local-cluster.sh", "down"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "LOCAL_SLURM_RUN_DIR": str(run)}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        time.sleep(0.2)
        assert bystander.poll() is None, "an unrelated process was killed"
        assert not (run / "slurmctld.pid").exists() and not (run / "slurmd-node1.pid").exists()
        assert open("/etc/hosts", "rb").read() == hosts
    finally:
        bystander.kill()
        bystander.wait()
