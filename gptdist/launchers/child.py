"""Running a launch script as a child that can be stopped whole.

`launch/train.sh` starts the deepspeed launcher, which starts the ranks. A time-out that killed only the shell would
leave the launcher and its ranks running (and holding cores, ports and the run directory's lock). The child runs in
a session of its own, so a time-out ends every process of it at once: SIGTERM to the group, then SIGKILL after a
grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence


def run_group(cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path, timeout: float,
              grace_s: float = 20.0) -> Optional[int]:
    """Run `cmd` with stdout and stderr in `log`; its exit status, or None when it ran past `timeout` seconds (its
    whole process group has then been stopped)."""
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass  # already gone
