"""safetensors files, read and written by gptdist itself: plain positioned reads, a streaming writer that hashes.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}, and an
optional "__metadata__" of strings) and the raw row-major bytes. Nothing in it is code: reading one never runs
anything. Two reasons for not using safetensors' own reader and writer:

* Reading: safetensors memory-maps the whole file, so every page a slice touches counts in the process's resident set
  for as long as the file is open; a rank reading its piece of a checkpoint would look (to the OS, and to a cluster's
  memory limit) like it held much more. Here each slice is read with positioned reads into the tensor that keeps it.
  And a checkpoint is untrusted input: the header is checked against the file's size before anything is allocated,
  so a crafted header cannot ask for terabytes.
* Writing: a checkpoint's files are hashed for its manifest and fsynced before it counts; writing, hashing and
  syncing in one pass reads each byte once, in the background writer's thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from gptdist.errors import UserError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# Same-width types numpy can expose as a buffer, for dtypes it cannot (bfloat16).
_BUFFER_TYPE = {torch.bfloat16: torch.int16}
MAX_HEADER = 64 << 20  # a header describes tensors; 64 MiB is far above any real one


def _item_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """One file's header, checked; reads of whole tensors or of one range of one dimension."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                self._bad("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, MAX_HEADER):
                self._bad(f"its header claims {length} bytes, more than the file holds")
            try:
                header = json.loads(fh.read(length))
            except (UnicodeDecodeError, ValueError):
                self._bad("its header is not JSON")
        if not isinstance(header, dict):
            self._bad("its header is not a JSON object")
        self._data_start = 8 + length
        data_size = size - self._data_start
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        if not (isinstance(self.metadata, dict) and all(isinstance(v, str) for v in self.metadata.values())):
            self._bad("its __metadata__ is not a mapping of strings")
        self._entries: Dict[str, dict] = {}
        for name, entry in header.items():
            self._entries[name] = self._checked(name, entry, data_size)

    def _bad(self, why: str) -> None:
        raise UserError(f"{self.path}: not a valid safetensors file: {why}; the checkpoint is damaged or was not "
                        "written by gptdist")

    def _checked(self, name: str, entry: object, data_size: int) -> dict:
        """The entry, once its dtype, shape and offsets agree with each other and with the file's size."""
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            self._bad(f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(n, int) and 0 <= n < 2**48 for n in shape):
            self._bad(f"tensor {name!r} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            self._bad(f"tensor {name!r} lies outside the file")
        numel = 1
        for n in shape:
            numel *= n
        if offsets[1] - offsets[0] != numel * _item_size(_DTYPES[entry["dtype"]]):
            self._bad(f"tensor {name!r}: its offsets do not match its shape")
        return entry

    def keys(self) -> List[str]:
        return list(self._entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor `name`, or its indices [start, stop) along `dim` (a new tensor either way)."""
        entry = self._entries[name]
        dtype = _DTYPES[entry["dtype"]]
        shape = list(entry["shape"]) or [1]
        item = _item_size(dtype)
        begin = entry["data_offsets"][0]
        if dim is None:
            dim, start, stop = 0, 0, shape[0]
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
        run = (stop - start) * inner  # bytes of one contiguous run
        with open(self.path, "rb", buffering=0) as fh:
            fd = fh.fileno()
            for o in range(outer):
                offset = self._data_start + begin + (o * shape[dim] + start) * inner
                _read_exactly(fd, buf[o * run:(o + 1) * run], offset, self.path, name)
        out = out.view(dtype) if dtype in _BUFFER_TYPE else out
        return out.reshape(entry["shape"]) if not entry["shape"] else out


def _read_exactly(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(view):  # one read returns at most ~2 GiB on Linux
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise UserError(f"{path}: {name} is truncated ({done} of {len(view)} bytes at offset {offset})")
        done += got


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> Tuple[int, str]:
    """Write contiguous CPU tensors to `path`, fsync it, and return (size in bytes, SHA-256), computed as the bytes
    go out: each byte is read once."""
    header: Dict[str, object] = {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            fh.write(chunk)
            digest.update(chunk)
        for t in tensors.values():
            if t.numel():
                data = t.view(_BUFFER_TYPE.get(t.dtype, t.dtype)).contiguous().numpy()
                view = memoryview(data).cast("B")
                for lo in range(0, len(view), 64 << 20):  # hashlib and write release the GIL on large buffers
                    piece = view[lo:lo + (64 << 20)]
                    fh.write(piece)
                    digest.update(piece)
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(blob) + offset, digest.hexdigest()
