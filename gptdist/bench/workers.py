"""Each benchmark row lives in a process of its own; the parent asks them in turn for timed windows of steps.

Why processes: peak memory is a per-process number (ru_maxrss never goes down), DeepSpeed's process group and
global state must not leak into the other rows, and a row that crashes must not take the table with it. Why in
turn: the machine is shared and its speed drifts, so repeat r of every row runs before repeat r+1 of any row and
each row sees the same noise; the starting row rotates so none is always first after a pause.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from gptdist.config import RunConfig
from gptdist.errors import UserError


@dataclass
class RowResult:
    row: str
    seconds: List[float] = field(default_factory=list)  # wall time of each timed window
    steps: int = 0  # steps per window
    peak_bytes: int = 0  # RSS (CPU) or max_memory_allocated (GPU) of the row's process
    info: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


def _peak_bytes() -> int:
    # torch: loaded in the spawned worker only; bench.table imports this module and stays light
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def _sync() -> None:
    # torch: loaded in the spawned worker only
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS between windows (glibc keeps them otherwise): five rows' workers stay
    alive side by side, and at vocab 50k each idles at ~0.7 GB after trimming instead of ~1.4 GB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _serve(conn, row: str, cfg_dict: Dict[str, Any], warmup: int) -> None:
    """The worker: build the row's runner, warm it up, then run timed windows until told to stop."""
    try:
        # torch: the runners load in the spawned worker only
        from gptdist.bench.runners import build_runner, describe

        runner = build_runner(row, RunConfig.model_validate(cfg_dict))
        for _ in range(warmup):
            runner.step()
        _sync()
        _release_free_memory()
        conn.send(("ready", describe(runner)))
        while True:
            steps = conn.recv()
            if steps is None:
                break
            _sync()
            start = time.perf_counter()
            for _ in range(steps):
                runner.step()
            _sync()
            seconds = time.perf_counter() - start
            _release_free_memory()
            conn.send(("ok", {"seconds": seconds, "peak_bytes": _peak_bytes()}))
    except Exception:  # noqa: BLE001 - reported to the parent, which prints it in the table
        conn.send(("error", traceback.format_exc()))
    finally:
        # gloo's threads can abort a process during interpreter teardown; everything is sent, so leave directly.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class _Worker:
    def __init__(self, ctx, row: str, cfg_dict: Dict[str, Any], warmup: int):
        self.result = RowResult(row)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, row, cfg_dict, warmup), name=f"bench-{row}", daemon=True)
        self.proc.start()
        child.close()

    def receive(self) -> Optional[Dict[str, Any]]:
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            kind, payload = "error", f"the {self.result.row} worker exited (exit code {self.proc.exitcode})"
        if kind == "error":
            self.result.error = payload
            return None
        return payload

    def close(self) -> None:
        if self.proc.is_alive() and self.result.error is None:
            self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def measure_rows(rows: Sequence[str], cfg_dict: Dict[str, Any], *, steps: int, warmup: int, repeats: int,
                 log=lambda message: None, each_round=None) -> List[RowResult]:
    """Build each row's worker in turn (start-up is not timed and must not disturb another row's warm-up), then
    run `repeats` rounds of `steps` timed steps per row, interleaved. each_round(r): a measurement of its own run
    in every round too (bench train's real training run), while the workers wait."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise UserError("--steps and --repeats must be at least 1, --warmup at least 0")
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or DeepSpeed state from the parent
    workers: List[_Worker] = []
    try:
        for row in rows:
            log(f"bench | starting {row}")
            worker = _Worker(ctx, row, cfg_dict, warmup)
            info = worker.receive()
            if info is not None:
                worker.result.info = info
            workers.append(worker)
        live = [w for w in workers if w.result.error is None]
        for r in range(repeats if live else 0):
            log(f"bench | round {r + 1}/{repeats}")
            if each_round is not None:
                each_round(r)
            for worker in live[r % len(live):] + live[: r % len(live)]:
                if worker.result.error is not None:
                    continue
                worker.conn.send(steps)
                out = worker.receive()
                if out is not None:
                    worker.result.seconds.append(out["seconds"])
                    worker.result.peak_bytes = out["peak_bytes"]
                    worker.result.steps = steps
    finally:
        for worker in workers:
            worker.close()
    return [w.result for w in workers]
