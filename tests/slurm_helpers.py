"""Shared by the Slurm tests: commands against the local cluster (slurm/local-cluster.sh), a job's state, its log."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict

import pytest

from tests.helpers import ROOT, cpu_env

NEEDS_SLURM = pytest.mark.skipif(
    os.geteuid() != 0 or (shutil.which("slurmctld") is None and shutil.which("apt-get") is None),
    reason="the local Slurm cluster needs root and either Slurm or apt-get to install it",
)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


def _sh(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cpu_env())


def _job(job_id: str) -> Dict[str, str]:
    try:
        out = _sh("scontrol", "show", "job", "-o", job_id).stdout
    except subprocess.TimeoutExpired:  # a controller starved of CPU by other test runs: ask again later
        return {}
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _wait(job_id: str, log: Path, timeout: float = 800) -> Dict[str, str]:
    # Generous: each attempt is ~1 min on an idle 2-core machine, but several times that when other runs share it.
    deadline = time.time() + timeout
    info: Dict[str, str] = {}
    while time.time() < deadline:
        info = _job(job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    _sh("scancel", job_id)
    pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout} s\n{_tail(log)}")


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(line for line in lines if "[INFO]" not in line)[-6000:]
