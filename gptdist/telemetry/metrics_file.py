"""Throughput, MFU and the per-step metrics record (RUN_DIR/metrics.jsonl), written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from gptdist.errors import UserError

# Dense peak FLOP/s per GPU from vendor datasheets (no sparsity), by precision. Matched by substring of the name.
_GPU_PEAKS = [
    ("H200", {"bf16": 989.5e12, "fp16": 989.5e12, "fp32": 494.7e12}),
    ("H100", {"bf16": 989.5e12, "fp16": 989.5e12, "fp32": 494.7e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    ("V100", {"bf16": 125e12, "fp16": 125e12, "fp32": 15.7e12}),
]


def datasheet_peak_flops(device_name: str, precision: str) -> Optional[float]:
    for key, peaks in _GPU_PEAKS:
        if key in device_name:
            return peaks.get(precision)
    return None


class MetricsLog:
    """Appends one JSON object per record; reopening a run directory continues the same file. A write that fails (a
    full disk) is reported once and training goes on: the records are in MLflow too, and a line the disk cut short is
    dropped when the run is resumed."""

    def __init__(self, path: Path, warn: Optional[Callable[[str], None]] = None):
        self.path = path
        self.warn = warn or (lambda message: None)
        self.failed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[Dict]) -> None:
        try:
            for record in records:
                self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            self.failed = False
        except OSError as exc:
            if not self.failed:
                self.warn(f"{self.path} could not be written ({exc.strerror or exc}); training goes on, the records "
                          "still go to MLflow; free space in run.dir")
            self.failed = True

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the last flush failed on a full disk: already reported


def read_metrics(path: Path, torn: Optional[List[str]] = None) -> List[Dict]:
    """Every record of metrics.jsonl. A last line that is not whole JSON (the disk filled, or the process died, in
    the middle of writing it) is left out and, when `torn` is given, appended to it; any other bad line is an error."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON; the file was edited or damaged: restore it or "
                                "remove the line") from None
            if torn is not None:
                torn.append(line.rstrip("\n"))
    return out


def truncate_metrics(path: Path, last_step: int, warn: Optional[Callable[[str], None]] = None) -> None:
    """Keep only the records of steps <= last_step (atomically): a resumed run redoes the steps after its
    checkpoint, and metrics.jsonl must not hold them twice. A torn last line is dropped with a warning."""
    if not path.exists():
        return
    torn: List[str] = []
    kept = [r for r in read_metrics(path, torn) if int(r.get("step", 0)) <= last_step]
    if torn and warn is not None:
        warn(f"{path}: dropped a torn last line ({torn[0][:60]!r}...): its write was cut short")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in kept:
            fh.write(json.dumps(record) + "\n")
    tmp.replace(path)
