"""Bytes of live tensors and their peak, on the device a rank trains on.

CUDA has these counters (torch.cuda.memory_allocated / max_memory_allocated / reset_peak_memory_stats). The CPU has
none, and torch.profiler's memory events are recorded per thread (gloo's worker threads free collective buffers
that the training thread allocated, so the profiler would see them live forever). On CPU ranks gptdist therefore
installs a counting allocator (csrc/counting_cpu_allocator.cpp, built once per machine with torch's extension
builder and cached under TORCH_EXTENSIONS_DIR, like DeepSpeed's own CPU ops): every CPU tensor allocated after
`install` is counted when it is made and when it is freed, on any thread. Counting costs the training step (large
blocks come straight from the kernel, so every step takes fresh pages), so the memory report stops it (`stop`) once
it has measured: the allocator is the process's only while it measures.

`bash launch/setup.sh` builds it on machines without a GPU, so a run does not wait for the compiler. Where a run
must build it (a new checkout of changed source), the wait is bounded: torch's builder waits forever on its `lock`
file, and a process killed while building leaves that file behind. gptdist therefore builds under its own lock
(an flock, released by the kernel when its holder dies): whoever holds it knows that a `lock` file of torch's is
stale and removes it, and whoever waits longer than BUILD_WAIT_S goes on without the counter, naming the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

log = logging.getLogger("gptdist.memory")
BUILD_WAIT_S = 45.0  # how long a rank waits for another process's build before training without the counter
_SOURCE = Path(__file__).resolve().parent / "csrc" / "counting_cpu_allocator.cpp"
_EXTENSION = None
_FAILED: Optional[str] = None


def counting_allocator():
    """The built extension module (None, with the reason in `build_problem()`, where it cannot be built)."""
    global _EXTENSION, _FAILED
    if _EXTENSION is None and _FAILED is None:
        try:
            # torch.utils.cpp_extension: slow to import, only when the allocator is built
            from torch.utils.cpp_extension import load

            source, build_dir = _stable_source()
            with _BuildLock(build_dir, BUILD_WAIT_S) as held:
                if not held:
                    _FAILED = (f"another process held {held.path} for {BUILD_WAIT_S:.0f} s (a build of the memory "
                               f"counter in progress; if none is, remove {held.path})")
                    return None
                _clear_stale_torch_lock(build_dir)
                _EXTENSION = load(name="gptdist_counting_cpu_allocator", sources=[str(source)],
                                  extra_cflags=["-O2"], build_directory=str(build_dir), verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers: report RSS only, never fail a run
            _FAILED = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return _EXTENSION


def _stable_source() -> Tuple[Path, Path]:
    """The source copied into a build folder named by its content. Built from the checkout's own path, every
    other checkout of the same gptdist (a CI clone, a second work tree) would look changed to ninja and rebuild it,
    in whichever rank loads it first; keyed by content, one build serves them all."""
    # torch.utils.cpp_extension: slow to import, only when the allocator is built
    from torch.utils.cpp_extension import _get_build_directory

    code = _SOURCE.read_bytes()
    digest = hashlib.sha256(code).hexdigest()[:16]
    folder = Path(_get_build_directory(f"gptdist_counting_cpu_allocator_{digest}", verbose=False))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _SOURCE.name
    if not target.exists() or target.read_bytes() != code:
        tmp = folder / f".{_SOURCE.name}.{os.getpid()}.tmp"
        tmp.write_bytes(code)
        tmp.replace(target)  # atomic: ranks loading at once see one whole file
    return target, folder


class _BuildLock:
    """An exclusive flock on BUILD_DIR/gptdist-build.flock, waited for at most `wait_s`; truthy when held."""

    def __init__(self, build_dir: Path, wait_s: float) -> None:
        self.path, self.wait_s, self._fd = build_dir / "gptdist-build.flock", wait_s, -1
        self.held = False

    def __enter__(self) -> "_BuildLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.held = True
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return self
                time.sleep(0.2)

    def __bool__(self) -> bool:
        return self.held

    def __exit__(self, *exc) -> None:
        os.close(self._fd)  # closing releases the flock


def _clear_stale_torch_lock(build_dir: Path) -> None:
    """Called holding the build lock: every build of this folder holds it while torch's `lock` exists, so a `lock`
    seen now was left by a process that died building (torch would wait on it forever)."""
    stale = build_dir / "lock"
    try:
        stale.unlink()
    except FileNotFoundError:
        return
    # Printed, not logged: it must reach the user whatever logging DeepSpeed has configured by now.
    print(f"gptdist | removed {stale}, a build lock left by a process killed while building the memory counter",
          file=sys.stderr, flush=True)


def build_problem() -> Optional[str]:
    return _FAILED


class LiveBytes:
    """live() and peak() since the last reset_peak(), for this rank's device; `available` is False where neither
    counter exists (a CPU rank whose counting allocator could not be built)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self._ext = None
        if device_type == "cpu":
            self._ext = counting_allocator()
            if self._ext is not None:
                self._ext.install()
        self.available = device_type == "cuda" or self._ext is not None
        self.stopped = False

    def stop(self) -> None:
        """Measuring is over: on a CPU the process gets its own allocator back (reads are meaningless from now on,
        as tensors made from now on are not counted)."""
        if self._ext is not None and not self.stopped:
            self._ext.uninstall()
        self.stopped = self._ext is not None

    def read(self) -> Tuple[int, int]:
        """(live bytes, peak bytes since the last reset)."""
        if self.device_type == "cuda":
            return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        if self._ext is not None:
            live, peak, _ = self._ext.stats()
            return int(live), int(peak)
        return 0, 0

    def reset_peak(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self._ext is not None:
            self._ext.reset_peak()

    def reserved_peak(self) -> Optional[int]:
        return torch.cuda.max_memory_reserved() if self.device_type == "cuda" else None


def main() -> int:
    """`python -m gptdist.telemetry.live_bytes`: build the CPU counting allocator now (launch/setup.sh does)."""
    if counting_allocator() is None:
        print(f"gptdist: the CPU memory counter could not be built ({build_problem()}); memory reports will show "
              "peak RSS only", flush=True)
        return 0
    print(f"gptdist: CPU memory counter built ({os.environ.get('TORCH_EXTENSIONS_DIR') or 'torch extensions cache'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
