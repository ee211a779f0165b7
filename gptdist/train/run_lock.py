"""A run directory belongs to one job at a time: RUN_DIR/.gptdist.lock, held by the job's rank 0.

Two jobs writing one run directory would prune each other's checkpoints and interleave their metrics. The lock
names its holder (host, process id and start time, the job) and carries a lease that the holder renews every
RENEW_S seconds by touching the lock file's time (the lease runs LEASE_S from the later of the record's lease_until
and that time). Another job (another Slurm job id, or another launch) is refused before any process group exists,
with one line naming the holder. A lock whose holder is gone is taken over with a warning: on the same host when
its process no longer exists (or is another process with the same id), on any host when its lease has expired.
A requeued Slurm job (the same job id) takes its own lock back at once.

Taking the lock is atomic: the record is written to a file of its own and hard-linked to the lock's name, which fails
where the name exists, so of two jobs starting together exactly one holds it. A stale lock is first renamed aside (one
taker succeeds); the taker keeps going only if what it moved is what it judged stale (each record carries a random
token, so no two records are the same bytes), and every taker confirms after linking that the lock's name leads to the
file it linked (device and inode): the one exact test of "is this still mine", for taking, renewing and releasing.

Renewing never writes the record again: the holder checks that the lock's name still leads to the very file it
linked (device and inode) and touches that file's time through a descriptor it keeps open on it, never by the lock's
name. A renewal racing a take-over therefore touches only the file the take-over moved away: it neither extends the
new holder's lease nor replaces its record. A holder whose renewal finds another file under the lock's name (this
process was stopped past its lease and the lock was taken over) records that it lost it (`lost`): the checkpointer
then neither saves nor prunes, and the run stops at its next step with one line naming the new holder.

Only rank 0 takes the lock; the launcher stops the other ranks when rank 0 exits. `gptdist check` reads it and
refuses the same way, so the launch scripts stop before starting any rank.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

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
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        if _loopback(addr):  # a single-node launch: the same port on another host is another job
            return f"launch at {addr}:{env['MASTER_PORT']} on {socket.gethostname()}"
        return f"launch at {addr}:{env['MASTER_PORT']}"
    return f"process {os.getpid()} on {socket.gethostname()}"


def _loopback(addr: str) -> bool:
    addr = addr.strip().strip("[]").lower()
    return addr in ("localhost", "::1", "0:0:0:0:0:0:0:1") or addr.startswith("127.") or addr.endswith(".localhost")


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
        self.lost_to: Optional[Dict] = None  # the record of the job that took the lock over while this one held it
        self._file: Optional[Tuple[int, int]] = None  # (device, inode) of the lock file this job linked
        self._fd: Optional[int] = None  # open on that file: renewals touch it through this, never by the lock's name
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Tuple[Optional[bytes], Optional[float]]:
        """The lock's bytes and its file's time (when its holder last renewed the lease), read from one open file."""
        try:
            with open(self.path, "rb") as fh:
                return fh.read(), os.fstat(fh.fileno()).st_mtime
        except FileNotFoundError:
            return None, None

    @staticmethod
    def _parse(raw: Optional[bytes]) -> Optional[Dict]:
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            return None  # a torn lock (its writer died mid-write): nobody holds it
        return data if isinstance(data, dict) else None

    def holder(self) -> Optional[Dict]:
        try:
            return self._with_renewal(*self._read())
        except OSError:
            return None

    def _with_renewal(self, raw: Optional[bytes], renewed: Optional[float]) -> Optional[Dict]:
        holder = self._parse(raw)
        if holder is not None and renewed is not None:
            holder["renewed"] = renewed  # not in the file: its time, which the holder's renewals move on
        return holder

    def stale_because(self, holder: Dict) -> Optional[str]:
        """Why the holder no longer holds the run directory, or None while it does."""
        if holder.get("job") == self.job:
            return "it is this job's own lock (a requeued or restarted attempt)"
        if holder.get("host") == socket.gethostname():
            started = _start_time(int(holder.get("pid", -1))) if str(holder.get("pid", "")).isdigit() else None
            if started is None or started != holder.get("started"):
                return f"process {holder.get('pid')} on this host is gone"
        leases = [holder.get("lease_until"), holder.get("renewed", 0) + LEASE_S]
        if max(x for x in leases if isinstance(x, (int, float))) < time.time():
            return "its lease expired"
        return None

    def _refuse_if_live(self, holder: Optional[Dict]) -> None:
        if holder is not None and self.stale_because(holder) is None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise UserError(f"run.dir={self.path.parent} is in use by {holder.get('job')} (host {holder.get('host')}, "
                            f"pid {holder.get('pid')}, since {since}); wait for it or stop it, or choose another "
                            f"run.dir (if that job is gone for good, remove {self.path})")

    def check(self) -> None:
        """Refuse (one line) while another live job holds the run directory."""
        self._refuse_if_live(self.holder())

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Rank 0, at the end of preflight: take the lock (or refuse), then keep its lease renewed."""
        self.check()
        holder = self.holder()
        if holder is not None and holder.get("job") != self.job:
            warn(f"taking over {self.path} from {holder.get('job')} (host {holder.get('host')}, pid "
                 f"{holder.get('pid')}): {self.stale_because(holder)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.mine = {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": _start_time(os.getpid()), "since": time.time(), "token": uuid.uuid4().hex}
        try:
            self._take()
        except BaseException:
            self.mine = None
            raise
        self._thread = threading.Thread(target=self._renew, name="gptdist-run-lock", daemon=True)
        self._thread.start()

    def _take(self, attempts: int = 50) -> None:
        """Link a record of this job to the lock's name (which fails where it exists); a stale lock found there is
        renamed aside first. Confirmed by the lock's name leading to this job's file."""
        tmp, fd = self._record_file()
        try:
            for _ in range(attempts):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    raw, renewed = self._read()
                    if raw is None:
                        continue  # moved aside meanwhile: try again
                    self._refuse_if_live(self._with_renewal(raw, renewed))
                    self._move_aside(raw)
                    continue
                st = os.fstat(fd)
                if self._identity() == (st.st_dev, st.st_ino):  # the lock's name leads to this job's file
                    self._hold(fd)
                    fd = None
                    return
                self._refuse_if_live(self.holder())  # another taker's record replaced this one
            raise UserError(f"could not take {self.path}: other jobs keep taking it; start one job per run.dir")
        finally:
            tmp.unlink(missing_ok=True)
            if fd is not None:
                os.close(fd)

    def _move_aside(self, stale: bytes) -> None:
        """Rename the lock away (one of several takers succeeds) and drop it, unless what was moved is not the stale
        record judged (another taker's fresh one): that is put back."""
        aside = self.path.with_name(f"{LOCK_FILE}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another taker moved it first
        try:
            if aside.read_bytes() != stale:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass  # a third taker linked its own: the displaced one finds out when it confirms
        finally:
            aside.unlink(missing_ok=True)

    def _record_file(self) -> Tuple[Path, int]:
        """A record of this job in a file of its own, and a descriptor open on it."""
        record = dict(self.mine, lease_until=time.time() + LEASE_S)
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(record))
        return tmp, os.open(tmp, os.O_RDONLY)

    def _hold(self, fd: int) -> None:
        """Make `fd` (from _record_file, now linked to the lock's name) the file this job holds."""
        if self._fd is not None and self._fd != fd:
            os.close(self._fd)
        st = os.fstat(fd)
        self._fd, self._file = fd, (st.st_dev, st.st_ino)

    def _renew(self) -> None:
        while self.lost_to is None and not self._stop.wait(RENEW_S):
            self.renew()

    def renew(self) -> None:
        """Extend the lease (the renewal thread, every RENEW_S) by touching the time of the file this job linked,
        through its descriptor, once the lock's name is seen to lead to it. Another file there (this process was
        stopped past its lease and the lock taken over) marks the lock lost. The record is never written again, and
        the touch never reaches another job's file, so a renewal can neither replace nor extend a new holder's."""
        if self.mine is None or self.lost_to is not None:
            return
        try:
            found = self._identity()
            if found is None:  # removed by hand: take it back, unless another job got there first
                tmp, fd = self._record_file()
                try:
                    os.link(tmp, self.path)
                    self._hold(fd)
                    fd = None
                except FileExistsError:
                    pass  # another job linked its own first
                finally:
                    tmp.unlink(missing_ok=True)
                    if fd is not None:
                        os.close(fd)
                found = self._identity()
            if found is None or found != self._file:
                self.lost_to = self.holder() or {"job": "an unreadable lock"}
                return
            # Through the descriptor: a take-over landing between the check and this touches nothing of the new
            # holder's (this job's file has left the lock's name), and is found at the next renewal.
            os.utime(self._fd)
        except OSError:
            pass  # a full disk or a hiccup of a shared file system: the lease lapses only if this goes on for LEASE_S

    def _identity(self) -> Optional[Tuple[int, int]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    @property
    def lost(self) -> Optional[str]:
        """One line naming the job that took this run directory over, once that has happened; else None."""
        if self.lost_to is None:
            return None
        h = self.lost_to
        return (f"run.dir={self.path.parent} was taken over by {h.get('job')} (host {h.get('host')}, pid "
                f"{h.get('pid')}) after this job's lease on {self.path} lapsed; this job stops without saving or "
                "pruning there")

    def release(self) -> None:
        """Safe to call more than once, and on ranks that never took it."""
        self._stop.set()
        if self.mine is None:
            return
        if self.lost_to is None and self._file is not None and self._identity() == self._file:
            self.path.unlink(missing_ok=True)
        if self._thread is not None:
            self._thread.join(timeout=10)  # a renewal in progress still uses the descriptor
        if self._fd is not None and not (self._thread is not None and self._thread.is_alive()):
            os.close(self._fd)  # left open (until exit) if a renewal hangs on a stalled file system
            self._fd = None
        self.mine = None
