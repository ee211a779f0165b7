"""Fault drills: make a rank die at a chosen point, as real crashes do, so that recovery is tested against real kills.

    GPTDIST_FAULTS="kill-after-save@10"            SIGKILL every rank once step 10's checkpoint is complete
    GPTDIST_FAULTS="kill-during-write@20:rank=1"   SIGKILL rank 1 while its background write of step 20's
                                                   checkpoint is under way (a torn save)
    GPTDIST_FAULTS="kill@7:rank=3"                 SIGKILL rank 3 right after step 7
    GPTDIST_FAULTS="nan-loss@5"                    the loss of optimizer step 5 becomes NaN (pp = 1)

Unset, it costs nothing. A value that does not parse is refused before any process group exists (preflight).
"""

from __future__ import annotations

import os
import signal
from typing import List, Mapping, Optional, Tuple

from gptdist.errors import UserError

KINDS = ("kill", "kill-after-save", "kill-during-write", "nan-loss")
_FORM = "KIND@STEP[:rank=R] items separated by commas, e.g. kill-after-save@10,kill@7:rank=1"


def parse_drills(spec: str) -> List[Tuple[str, int, int]]:
    """(kind, step, rank; -1 for every rank) of each item; a UserError naming the item that does not parse."""
    drills = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, opts = item.partition(":")
        kind, at, step = head.partition("@")
        rank = "-1"
        if opts:
            name, eq, rank = opts.partition("=")
            if name.strip() != "rank" or not eq:
                raise UserError(f"GPTDIST_FAULTS={spec!r}: {item!r}: only ':rank=R' may follow the step; write {_FORM}")
        if kind not in KINDS or not at:
            raise UserError(f"GPTDIST_FAULTS={spec!r}: {item!r}: unknown drill {kind!r} (known: {', '.join(KINDS)}); "
                            f"write {_FORM}")
        if not step.strip().isdigit() or not rank.strip().lstrip("-").isdigit() or int(rank) < -1:
            raise UserError(f"GPTDIST_FAULTS={spec!r}: {item!r}: the step and rank must be whole numbers; write "
                            f"{_FORM}")
        drills.append((kind, int(step), int(rank)))
    return drills


class FaultDrills:
    def __init__(self, rank: int, env: Optional[Mapping[str, str]] = None):
        self.rank = rank
        self.drills = parse_drills((os.environ if env is None else env).get("GPTDIST_FAULTS", ""))

    def due(self, kind: str, step: int) -> bool:
        return any(k == kind and s == step and r in (-1, self.rank) for k, s, r in self.drills)

    def kill_if_due(self, kind: str, step: int) -> None:
        if self.drills and self.due(kind, step):
            os.kill(os.getpid(), signal.SIGKILL)
