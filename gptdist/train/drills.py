"""Fault injection for reliability drills: make a rank die at a chosen point, as real crashes do.

    GPTDIST_FAULTS="kill-after-save@10"            SIGKILL every rank once step 10's checkpoint is complete
    GPTDIST_FAULTS="kill-during-save@20:rank=1"    SIGKILL rank 1 after its shards of step 20 are written,
                                                   before the manifest (a torn save)
    GPTDIST_FAULTS="kill@7:rank=3"                 SIGKILL rank 3 right after step 7
    GPTDIST_FAULTS="nan-loss@5"                    the loss of optimizer step 5 becomes NaN (pp = 1)

Unset, it costs nothing. It exists so that the recovery paths are tested against real kills, not mocks.
"""

from __future__ import annotations

import os
import signal
from typing import List, Tuple


def _parse(spec: str) -> List[Tuple[str, int, int]]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, opts = item.partition(":")
        kind, _, step = head.partition("@")
        rank = -1
        if opts.startswith("rank="):
            rank = int(opts[len("rank="):])
        faults.append((kind, int(step), rank))
    return faults


class Faults:
    def __init__(self, rank: int, spec: str | None = None):
        self.rank = rank
        self.faults = _parse(spec if spec is not None else os.environ.get("GPTDIST_FAULTS", ""))

    def due(self, kind: str, step: int) -> bool:
        return any(k == kind and s == step and r in (-1, self.rank) for k, s, r in self.faults)

    def at(self, kind: str, step: int) -> None:
        if self.faults and self.due(kind, step):
            os.kill(os.getpid(), signal.SIGKILL)
