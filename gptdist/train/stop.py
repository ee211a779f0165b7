"""Stopping cleanly on request: SIGTERM, SIGINT, or SIGUSR1 (the warning Slurm sends before preemption or the
time limit, `#SBATCH --signal=B:USR1@120`).

A signal only sets a flag. After each optimizer step the ranks agree (one tiny all-reduce) whether any of them
was asked to stop; if so every rank finishes that step, the checkpoint is saved, `RUN_DIR/stopped.json` says why,
and the process exits 0 so that the launcher does not tear the other ranks down. `resume=auto` continues from
there. A second SIGINT aborts at once (Ctrl-C twice).
"""

from __future__ import annotations

import signal
from typing import Callable, Optional

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self, world_size: int = 2, disowned: Callable[[], Optional[str]] = lambda: None) -> None:
        """disowned: on rank 0, why run.dir is no longer this run's (its lock was taken over), or None."""
        self.world_size = world_size
        self.received: Optional[int] = None
        self.disowned = disowned
        self.lost = False  # agreed by every rank: run.dir's lock was taken over, the run must stop without saving
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank received a stop signal or lost run.dir's lock (then `lost`)."""
        code = 2.0 if self.disowned() else 1.0 if self.received else 0.0
        if self.world_size > 1:  # else nobody to agree with: no collective, no host sync
            flag = torch.tensor([code], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = flag.item()
        self.lost = code >= 2.0
        return code > 0.0
