"""The token cache: tokenized blocks and document indexes, shared by every rank of a job and reused by later runs.

    CACHE/                                   data.cache (default RUN_DIR/token_cache; a shared path to reuse it)
      index/<file key>.npz, .json            each local file's document index (doc_index.py), keyed by the file's
                                             path, size and modification time: rebuilt only when the file changes
      seek/<unit key>/<documents>.json       positions in streamed sources (hub datasets, compressed files):
                                             `datasets`' state_dict after that many documents (streamed.py)
      blocks/<stream key>/<block>.tok, .json  block c of the mixed, shuffled document stream: its tokens (uint16,
                                             or int32 for vocabularies over 65535), and a record with the token
                                             count, a checksum and the source cursors at its start and end

The stream key covers everything a block's content depends on: the data plan's digest (sources, weights, fields,
split, tokenizer, block size, shuffling), the seed, and every source file's key, so a changed file starts a new
stream (its blocks are tokenized anew) while the indexes of unchanged files stay valid.

Like a checkpoint, an entry counts only once its record (.json) is written, last, by an atomic rename: a reader
never sees a half-written block. A block whose tokens do not match the record's checksum is reported, removed and
tokenized again. With data.cache=off the blocks live in this process's memory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from gptdist.data.doc_index import DocIndex

log = logging.getLogger("gptdist.data")


def cache_folder(data_cfg, run_dir: Path) -> Optional[Path]:
    """Where data.cache points: RUN_DIR/token_cache for 'run', None for 'off', else the folder given."""
    spec = data_cfg.cache
    if spec == "off":
        return None
    return Path(run_dir) / "token_cache" if spec == "run" else Path(spec).expanduser()


def node_folder(folder: Path) -> Path:
    """data.cache_scope=node: this node's own part of the cache folder."""
    import socket

    return Path(folder) / f"node-{socket.gethostname()}"


def block_record(block, end) -> dict:
    """What a cached block records besides its tokens: the source cursors at its start and end, its document count
    and the files found bad before it."""
    return {"start": block.cursors, "end": end, "documents": block.documents, "bad": block.bad}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class CacheDir:
    """The cache folder: document indexes and the blocks of one stream."""

    def __init__(self, root: Path, stream_key: str) -> None:
        self.root = Path(root)
        self.index_dir = self.root / "index"
        self.block_dir = self.root / "blocks" / stream_key
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.block_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------------ indexes

    def load_index(self, key: str) -> Optional[DocIndex]:
        meta_path = self.index_dir / f"{key}.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            arrays = np.load(self.index_dir / f"{key}.npz")
            if checksum(arrays["starts"].tobytes() + arrays["ends"].tobytes()) != meta["checksum"]:
                raise ValueError("checksum mismatch")
            return DocIndex(meta["path"], meta["mode"], arrays["starts"], arrays["ends"], meta["text_field"],
                            meta["bad"], meta["bad_line"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("token cache: the document index %s is damaged (%s); building it again", meta_path, exc)
            for p in (meta_path, self.index_dir / f"{key}.npz"):
                p.unlink(missing_ok=True)
            return None

    def save_index(self, key: str, index: DocIndex) -> int:
        """Writes the index; returns the bytes written."""
        import io

        arrays = index.to_arrays()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _atomic_write(self.index_dir / f"{key}.npz", buf.getvalue())
        meta = json.dumps({**index.meta(), "checksum": checksum(arrays["starts"].tobytes() + arrays["ends"].tobytes())})
        _atomic_write(self.index_dir / f"{key}.json", meta.encode())
        return len(buf.getvalue()) + len(meta)

    # ------------------------------------------------------------------------- positions in streamed sources

    def save_seek(self, key: str, documents: int, position) -> None:
        folder = self.root / "seek" / key
        folder.mkdir(parents=True, exist_ok=True)
        record = {"documents": documents, "position": position}
        _atomic_write(folder / f"{documents:012d}.json", json.dumps(record).encode())

    def seeks(self, key: str):
        """(documents, datasets position) saved for a streamed unit; unreadable entries are skipped."""
        folder = self.root / "seek" / key
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
                out.append((int(entry["documents"]), entry["position"]))
            except (OSError, ValueError, KeyError):
                continue
        return out

    # ------------------------------------------------------------------------------------------------- blocks

    def block_meta(self, c: int) -> Optional[dict]:
        path = self.block_dir / f"{c:09d}.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"damaged": True}

    def get_block(self, c: int) -> Tuple[Optional[np.ndarray], Optional[dict], Optional[str]]:
        """(tokens, record, problem): (None, None, None) when the block is not in the cache yet."""
        meta = self.block_meta(c)
        if meta is None:
            return None, None, None
        tok_path = self.block_dir / f"{c:09d}.tok"
        try:
            if meta.get("damaged"):
                raise ValueError("its record is not valid JSON")
            data = tok_path.read_bytes()
            if len(data) != meta["tokens"] * np.dtype(meta["dtype"]).itemsize:
                raise ValueError(f"{len(data)} bytes for {meta['tokens']} tokens")
            if checksum(data) != meta["checksum"]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError) as exc:
            self.drop_block(c)
            return None, None, f"token cache block {c} in {self.block_dir} is damaged ({exc})"
        return np.frombuffer(data, dtype=meta["dtype"]).astype(np.int32), meta, None

    def put_block(self, c: int, tokens: np.ndarray, meta: dict) -> int:
        """Writes the block; returns the bytes written."""
        dtype = np.uint16 if int(tokens.max(initial=0)) < 2**16 else np.int32
        data = tokens.astype(dtype).tobytes()
        _atomic_write(self.block_dir / f"{c:09d}.tok", data)
        record = {**meta, "block": c, "tokens": int(len(tokens)), "dtype": np.dtype(dtype).name,
                  "checksum": checksum(data)}
        encoded = json.dumps(record).encode()
        _atomic_write(self.block_dir / f"{c:09d}.json", encoded)
        return len(data) + len(encoded)

    def put_tokenized(self, block, end) -> int:
        return self.put_block(block.index, block.tokens, block_record(block, end))

    def drop_block(self, c: int) -> None:
        for suffix in (".json", ".tok"):
            (self.block_dir / f"{c:09d}{suffix}").unlink(missing_ok=True)


class MemoryCache:
    """data.cache=off: this process's blocks and indexes, in memory (each rank tokenizes all it needs)."""

    def __init__(self) -> None:
        self._indexes: Dict[str, DocIndex] = {}
        self._seeks: Dict[str, list] = {}
        self._blocks: Dict[int, Tuple[np.ndarray, dict]] = {}
        self._lock = threading.Lock()

    def load_index(self, key: str) -> Optional[DocIndex]:
        return self._indexes.get(key)

    def save_index(self, key: str, index: DocIndex) -> int:
        self._indexes[key] = index
        return 0

    def save_seek(self, key: str, documents: int, position) -> None:
        self._seeks.setdefault(key, []).append((documents, position))

    def seeks(self, key: str):
        return list(self._seeks.get(key, ()))

    def block_meta(self, c: int) -> Optional[dict]:
        entry = self._blocks.get(c)
        return entry[1] if entry else None

    def get_block(self, c: int):
        with self._lock:
            entry = self._blocks.pop(c, None)  # each block is read once: keep memory bounded
        if entry is None:
            return None, None, None
        return entry[0], entry[1], None

    def put_block(self, c: int, tokens: np.ndarray, meta: dict) -> int:
        with self._lock:
            self._blocks[c] = (tokens, {**meta, "block": c, "tokens": int(len(tokens))})
        return 0

    def put_tokenized(self, block, end) -> int:
        return self.put_block(block.index, block.tokens, block_record(block, end))

    def drop_block(self, c: int) -> None:
        self._blocks.pop(c, None)
