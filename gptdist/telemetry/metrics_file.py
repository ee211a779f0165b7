"""Throughput, MFU and the per-step metrics record (RUN_DIR/metrics.jsonl), written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

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
    full disk) is reported once and training goes on: the records are in MLflow too. The write after a failed one
    starts a new line, so that a record never follows the fragment a failed write may have left; a resume drops such
    fragments (`read_metrics`)."""

    def __init__(self, path: Path, warn: Optional[Callable[[str], None]] = None):
        self.path = path
        self.warn = warn or (lambda message: None)
        self.failed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[Dict]) -> None:
        try:
            if self.failed:
                self._file.write("\n")  # end whatever part of a line the failed write left (an empty line is skipped)
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


def read_metrics(path: Path, torn: Optional[List[Tuple[int, str, bool]]] = None) -> List[Dict]:
    """Every record of metrics.jsonl. A line that is not whole JSON (the disk filled, or the process died, in the
    middle of writing it) is left out and, when `torn` is given, appended to it as (line number, text, whether it is
    the last line); a line that is JSON but not a record (an object) is an error: the file was edited."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [(i + 1, line) for i, line in enumerate(fh) if line.strip()]
    out = []
    for k, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if torn is not None:
                torn.append((number, line.rstrip("\n"), k == len(lines) - 1))
            continue
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is not a JSON object; the file was edited or damaged: restore it "
                            "or remove the line")
        out.append(record)
    return out


def truncate_metrics(path: Path, last_step: int, warn: Optional[Callable[[str], None]] = None) -> None:
    """Keep only the records of steps <= last_step (atomically): a resumed run redoes the steps after its
    checkpoint, and metrics.jsonl must not hold them twice. A torn line is dropped with a warning naming it."""
    if not path.exists():
        return
    torn: List[Tuple[int, str, bool]] = []
    kept = [r for r in read_metrics(path, torn) if int(r.get("step", 0)) <= last_step]
    for number, text, last in torn[:5] if warn is not None else ():
        warn(f"{path}: dropped a torn {'last ' if last else ''}line (line {number}: {text[:60]!r}...): its write was "
             "cut short")
    if len(torn) > 5 and warn is not None:
        warn(f"{path}: dropped {len(torn) - 5} more torn lines (lines {', '.join(str(t[0]) for t in torn[5:12])}...)")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in kept:
            fh.write(json.dumps(record) + "\n")
    tmp.replace(path)
