"""Run a layout for a few steps under the real launcher and measure it: what `gptdist plan --measure` and the
memory tests compare predictions with.

Each run is `launch/train.sh` (the deepspeed launcher) with the layout's overrides. Inside, every rank writes its
memory report (telemetry/memory.py). Outside, a watcher polls /proc for the run's rank processes (found by the run
directory on their command line, ranked by the RANK in their environment) and keeps each one's VmHWM, the peak
resident set the kernel counted, until it exits: a figure that owes nothing to gptdist's own accounting.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from gptdist.launchers.child import run_group

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Measured:
    run_dir: Path
    ranks: int
    returncode: Optional[int] = None
    error: str = ""
    reports: Dict[int, dict] = field(default_factory=dict)  # rank -> RUN_DIR/memory/rank_<r>.json
    vm_hwm: Dict[int, int] = field(default_factory=dict)  # rank -> peak RSS bytes seen from outside
    io: Dict[int, Dict[str, int]] = field(default_factory=dict)  # rank -> /proc/PID/io counters, as last seen
    step_times: List[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    def step_time(self, skip: int = 1) -> Optional[float]:
        times = self.step_times[skip:] or self.step_times
        return statistics.median(times) if times else None


class RankWatcher(threading.Thread):
    """Polls /proc every `interval` s for processes running `gptdist.cli train` with `marker` on the command
    line; records the largest VmHWM of each, by its RANK, and its I/O counters (/proc/PID/io) as last seen."""

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.marker, self.interval = marker, interval
        self.hwm: Dict[int, int] = {}
        self.io: Dict[int, Dict[str, int]] = {}  # rchar, wchar, ... of each rank's process
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)
        self.poll()

    def poll(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                # The ranks run `python -u -m gptdist.cli train ...`; the launchers name it with --module.
                if "-m gptdist.cli train" not in cmd or self.marker not in cmd:
                    continue
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
                status = Path(f"/proc/{pid}/status").read_text()
                io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
            except (OSError, ValueError):
                continue  # gone, or not ours to read
            if rank is None:
                continue
            self.io[rank] = {k: int(v) for k, v in io.items()}
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    value = int(line.split()[1]) * 1024
                    self.hwm[rank] = max(self.hwm.get(rank, 0), value)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def run_layout(config: str, overrides: Sequence[str], ranks: int, run_dir: Path, *, timeout: float = 900,
               env: Optional[Dict[str, str]] = None, log: Optional[Path] = None) -> Measured:
    """One short training run of `config` + `overrides` on `ranks` CPU or GPU ranks of this machine."""
    env = {**os.environ, **(env or {})}
    env.setdefault("GPUS_PER_NODE", str(ranks))
    env["GPUS_PER_NODE"] = str(ranks)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), config, *overrides, f"run.dir={run_dir}"]
    out = Measured(run_dir, ranks)
    watcher = RankWatcher(str(run_dir))
    watcher.start()
    log = log or run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Its own process group: a time-out stops the launcher and every rank it started, not only the shell.
        status = run_group(cmd, cwd=ROOT, env=env, log=log, timeout=timeout)
        if status is None:
            out.error = f"timed out after {timeout:.0f} s (log: {log})"
        else:
            out.returncode = status
    finally:
        watcher.stop()
    out.vm_hwm = dict(watcher.hwm)
    out.io = dict(watcher.io)
    # torch: only after a measured run; `gptdist plan` starts without it
    from gptdist.telemetry.memory import read_reports

    if (run_dir / "memory").is_dir():
        out.reports = read_reports(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        out.step_times = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines()
                          if line.strip() and "step_time_s" in json.loads(line)]
    # A run that finished its steps counts even if the launcher's exit was unclean (gloo teardown, see notes).
    if not out.error and not (run_dir / "run_complete.json").exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        out.error = f"exit {out.returncode}: {' / '.join(tail)[-400:]} (log: {log})"
    elif not out.error and len(out.reports) != ranks:
        out.error = f"{len(out.reports)} of {ranks} ranks wrote a memory report (log: {log})"
    return out

