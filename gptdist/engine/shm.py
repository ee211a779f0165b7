"""Shared memory in /dev/shm: gptdist makes none, and clears what killed DeepSpeed runs left behind.

DeepSpeed's CPU communication backend maps a 66 MB /dev/shm file per rank for its shared-memory all-reduce and
never deletes it (at world 1 too: its own clean-up returns early there). That all-reduce serves only DeepSpeed's
inference path (`inference_all_reduce`); training's collectives go through the process group. gptdist therefore
switches the op off before DeepSpeed starts (no file, and no op compiled at run time), and at each start removes
the files of earlier runs whose every user is gone: no live process maps or holds them open.
"""

from __future__ import annotations

import glob
import os
from typing import Iterable, List, Set

SHM = "/dev/shm"
# What DeepSpeed's shared-memory op names its files (SHM_BUFFER_NAME in deepspeed/ops/csrc/cpu/comm/shm.cpp).
STALE_PATTERNS = ("deepspeed_allreduce_buffer_*",)
SHM_OP = "deepspeed_shm_comm"


def disable_shm_op() -> None:
    """Before deepspeed.init_distributed: DeepSpeed asks this table whether its shm op can load on this machine."""
    # deepspeed: slow to import, only when the op is disabled
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def paths_in_use(folder: str = SHM) -> Set[str]:
    """Every path under `folder` that some process this user can see maps or holds open."""
    prefix = folder.rstrip("/") + "/"
    used: Set[str] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(line[at:].rstrip("\n").removesuffix(" (deleted)"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    used.add(target)
        except OSError:  # gone, or another user's process: its files are not ours to remove either
            continue
    return used


def clear_stale_shm(patterns: Iterable[str] = STALE_PATTERNS, folder: str = SHM) -> List[str]:
    """Remove this user's DeepSpeed files in /dev/shm that no live process uses; returns what was removed."""
    if not os.path.isdir(folder):
        return []
    candidates = sorted({p for pattern in patterns for p in glob.glob(os.path.join(folder, pattern))})
    mine = [p for p in candidates if _owned(p)]
    if not mine:
        return []
    used = paths_in_use(folder)
    removed = []
    for path in mine:
        if path in used:
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:  # removed by a rank beside us, or not ours after all
            pass
    return removed


def _owned(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:
        return False
