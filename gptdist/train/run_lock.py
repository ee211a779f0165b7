"""A run directory belongs to one job at a time: RUN_DIR/.gptdist.lock, held by the job's rank 0.

Two jobs writing one run directory would prune each other's checkpoints and interleave their metrics. The lock
names its holder (host, process id and start time, the job) and carries a lease that the holder renews every
RENEW_S seconds. Another job (another Slurm job id, or another launch) is refused before any process group exists,
with one line naming the holder. A lock whose holder is gone is taken over with a warning: on the same host when
its process no longer exists (or is another process with the same id), on any host when its lease has expired.
A requeued Slurm job (the same job id) takes its own lock back at once.

Only rank 0 takes the lock; the launcher stops the other ranks when rank 0 exits. `gptdist check` reads it and
refuses the same way, so the launch scripts stop before starting any rank.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

from gptdist.errors import UserError

LOCK_FILE = ".gptdist.lock"
LEASE_S = 180.0
RENEW_S = 30.0


def job_identity(env: Mapping[str, str]) -> str:
    """What the ranks of one job share and another job does not: Slurm's job id, else the rendezvous address (two
    live jobs cannot listen on one port), else this process."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm job {env['SLURM_JOB_ID']}"
    if env.get("MASTER_PORT") and env.get("WORLD_SIZE", "1") != "1":
        return f"launch at {env.get('MASTER_ADDR', '127.0.0.1')}:{env['MASTER_PORT']}"
    return f"process {os.getpid()} on {socket.gethostname()}"


def _start_time(pid: int) -> Optional[str]:
    """When process `pid` started (clock ticks since boot) with this boot's id: a reused pid reads differently."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        return f"{boot}:{fields[19]}"
    except (OSError, IndexError):
        return None


class RunLock:
    def __init__(self, run_dir: Path, env: Optional[Mapping[str, str]] = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.job = job_identity(os.environ if env is None else env)
        self.mine: Optional[Dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def holder(self) -> Optional[Dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # no lock, or a torn one (its writer died mid-write): nobody holds it
        return data if isinstance(data, dict) else None

    def stale_because(self, holder: Dict) -> Optional[str]:
        """Why the holder no longer holds the run directory, or None while it does."""
        if holder.get("job") == self.job:
            return "it is this job's own lock (a requeued or restarted attempt)"
        if holder.get("host") == socket.gethostname():
            started = _start_time(int(holder.get("pid", -1))) if str(holder.get("pid", "")).isdigit() else None
            if started is None or started != holder.get("started"):
                return f"process {holder.get('pid')} on this host is gone"
        lease = holder.get("lease_until")
        if not isinstance(lease, (int, float)) or lease < time.time():
            return "its lease expired"
        return None

    def check(self) -> None:
        """Refuse (one line) while another live job holds the run directory."""
        holder = self.holder()
        if holder is not None and self.stale_because(holder) is None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise UserError(f"run.dir={self.path.parent} is in use by {holder.get('job')} (host {holder.get('host')}, "
                            f"pid {holder.get('pid')}, since {since}); wait for it or stop it, or choose another "
                            f"run.dir (if that job is gone for good, remove {self.path})")

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Rank 0, at the end of preflight: take the lock (or refuse), then keep its lease renewed."""
        self.check()
        holder = self.holder()
        if holder is not None and holder.get("job") != self.job:
            warn(f"taking over {self.path} from {holder.get('job')} (host {holder.get('host')}, pid "
                 f"{holder.get('pid')}): {self.stale_because(holder)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.mine = {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": _start_time(os.getpid()), "since": time.time()}
        self._write()
        self._thread = threading.Thread(target=self._renew, name="gptdist-run-lock", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        record = dict(self.mine, lease_until=time.time() + LEASE_S)
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            holder = self.holder()
            if holder is None or holder.get("job") != self.job or holder.get("pid") != os.getpid():
                return  # taken over (this process was stopped past its lease): the other job owns it now
            try:
                self._write()
            except OSError:
                pass  # a full disk: the lease lapses only if this goes on for LEASE_S

    def release(self) -> None:
        """Safe to call more than once, and on ranks that never took it."""
        self._stop.set()
        if self.mine is None:
            return
        holder = self.holder()
        if holder is not None and holder.get("job") == self.job and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.mine = None
