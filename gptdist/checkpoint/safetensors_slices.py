"""Read tensors, or one range of one dimension of a tensor, from a .safetensors file with plain reads.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}) and the
raw row-major bytes. safetensors' own reader memory-maps the whole file: every page a slice touches then counts in
the process's resident set for as long as the file stays open, so a rank reading its 1/tp of a checkpoint would
look (to the OS, and to a cluster's memory limit) like it held much more. Here each slice is read with positioned
reads straight into the tensor that keeps it: the rank's memory holds its piece and nothing else.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# Same-width types numpy can expose as a writable buffer, for dtypes it cannot (bfloat16).
_BUFFER_TYPE = {torch.bfloat16: torch.int16}


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        self._data_start = 8 + length
        self._entries: Dict[str, dict] = {k: v for k, v in header.items() if k != "__metadata__"}

    def keys(self) -> List[str]:
        return list(self._entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor `name`, or its indices [start, stop) along `dim` (a new tensor either way)."""
        entry = self._entries[name]
        dtype = _DTYPES[entry["dtype"]]
        shape = list(entry["shape"])
        item = torch.empty((), dtype=dtype).element_size()
        begin, end = entry["data_offsets"]
        if dim is None:
            dim, start, stop = 0, 0, shape[0] if shape else 1
            if not shape:
                shape = [1]
        stop = shape[dim] if stop is None else stop
        if not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"{self.path}: {name}: range [{start}, {stop}) outside dim {dim} of size {shape[dim]}")
        outer = 1
        for n in shape[:dim]:
            outer *= n
        inner = item
        for n in shape[dim + 1:]:
            inner *= n
        out_shape = shape[:dim] + [stop - start] + shape[dim + 1:]
        out = torch.empty(out_shape, dtype=_BUFFER_TYPE.get(dtype, dtype))
        buf = memoryview(out.numpy()).cast("B")
        run = (stop - start) * inner
        with open(self.path, "rb", buffering=0) as fh:
            fd = fh.fileno()
            for o in range(outer):
                offset = self._data_start + begin + (o * shape[dim] + start) * inner
                _read_exactly(fd, buf[o * run:(o + 1) * run], offset, self.path, name)
        if end - begin != outer * shape[dim] * inner:
            raise ValueError(f"{self.path}: {name}: header says {end - begin} bytes for shape {shape}")
        out = out.view(dtype) if dtype in _BUFFER_TYPE else out
        return out.reshape(entry["shape"]) if not entry["shape"] else out


def _read_exactly(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(view):  # one read returns at most ~2 GiB on Linux
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"{path}: {name} is truncated ({done} of {len(view)} bytes at offset {offset})")
        done += got
