"""The job's peak FLOP/s, the denominator of MFU.

MFU = achieved model FLOP/s / the peak of every rank of the job together. On a GPU the peak is the datasheet's
dense rate for the training precision (or `train.peak_flops`). On a CPU there is no datasheet worth trusting, so the
ceiling is measured, and measured the way the job runs: every rank at once, after a barrier, each with the threads
it trains with (its share of the node's cores), for long enough that a scheduler hiccup does not count. Timing one
rank while the others are still importing (what gptdist did before) measured a contended core and gave MFUs of
100-400 %. Every run measures (0.4 s) and keeps the best figure ever measured for the machine and per-rank share in
a cache: a measurement taken while other jobs loaded the machine would otherwise hide MFU ("above 100 %") for every
later run, and a run whose own model FLOP/s exceed the peak raises the cached figure to them, so the next run's MFU
shows.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

from gptdist.machine import usable_cores
from gptdist.telemetry.metrics_file import datasheet_peak_flops

MEASURE_S = 0.4  # seconds of matmuls per rank, after one warm-up
CACHE_VERSION = 1


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gptdist" / "cpu_peak.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(threads: int, local_ranks: int) -> str:
    # torch: only when a peak is measured
    import torch

    return (f"v{CACHE_VERSION}|{platform.node()}|{_cpu_model()}|cores={usable_cores()}|threads={threads}|"
            f"local_ranks={local_ranks}|torch={torch.__version__}")


def measure_rank_flops(seconds: float = MEASURE_S, n: int = 1024) -> float:
    """fp32 matmul FLOP/s of this process with its current threads: the best of several timed rounds."""
    # torch: only when a peak is measured
    import torch

    gen = torch.Generator().manual_seed(0)  # its own stream: training's random streams are not touched
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up: thread pool and MKL's buffers
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best = max(best, 4 * 2 * n**3 / elapsed)
        if time.perf_counter() >= deadline:
            return best


def _read_cache(key: str) -> Optional[float]:
    try:
        value = json.loads(cache_path().read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _write_cache(key: str, per_rank: float) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        # The best figure wins, also against a job that wrote between our read and our write.
        entries[key] = max(per_rank, entries.get(key, 0.0) if isinstance(entries.get(key), (int, float)) else 0.0)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measure again next time


def job_peak_flops(configured: Optional[float], device_type: str, precision: str, world_size: int,
                   local_world_size: int, is_main: bool) -> Optional[float]:
    """Collective on CPU (every rank calls it after the process group exists). None: no honest peak is known."""
    if configured:
        return configured * world_size
    if device_type == "cuda":
        # torch: only when a peak is measured; `gptdist plan` imports this module and starts without it
        import torch

        found = datasheet_peak_flops(torch.cuda.get_device_name(), precision)
        return found * world_size if found else None
    return _cpu_job_peak(world_size, local_world_size, is_main)


def _cpu_job_peak(world_size: int, local_world_size: int, is_main: bool) -> float:
    # torch: only when a peak is measured
    import torch
    import torch.distributed as dist

    key = cache_key(torch.get_num_threads(), local_world_size)
    distributed = dist.is_available() and dist.is_initialized() and world_size > 1
    if distributed:
        dist.barrier()  # everyone starts together, so each rank is timed while the others also compute
    # [this run's measurement summed over ranks, the best cached per-rank figure (rank 0's cache)]
    rates = torch.tensor([measure_rank_flops(), (_read_cache(key) or 0.0) if is_main else 0.0], dtype=torch.float64)
    if distributed:
        dist.all_reduce(rates)
    measured, cached = float(rates[0]) / (world_size if distributed else 1), float(rates[1])
    best = max(measured, cached)
    if is_main and best > cached:
        _write_cache(key, best)
    return best * world_size


def raise_cpu_peak(achieved_job_flops: float, world_size: int, local_world_size: int) -> None:
    """A run achieved more model FLOP/s than the peak it was given: the machine can do at least that, so the
    cached figure rises to it and the next run's MFU shows (this run's stays hidden: its peak was wrong)."""
    # torch: only when a peak is measured
    import torch

    _write_cache(cache_key(torch.get_num_threads(), local_world_size), achieved_job_flops / world_size)


def mfu(tokens_per_s: float, flops_per_token: float, job_peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization of the job, or None where it cannot be right (no peak, or above 100 %: the peak was
    underestimated, and a number over 1 would only mislead)."""
    if not job_peak:
        return None
    value = tokens_per_s * flops_per_token / job_peak
    return value if value <= 1.0 else None
