"""Throughput, MFU and the per-step metrics record (RUN_DIR/metrics.jsonl), written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

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
    """Appends one JSON object per optimizer step; reopening a run directory continues the same file."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[Dict]) -> None:
        for record in records:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> List[Dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= last_step (atomically): a resumed run redoes the steps after its
    checkpoint, and metrics.jsonl must not hold them twice."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r["step"]) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in kept:
            fh.write(json.dumps(record) + "\n")
    tmp.replace(path)
