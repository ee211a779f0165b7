"""The token cache: tokenized blocks and document indexes, shared by every rank of a job and reused by later runs.

    CACHE/                                   data.cache (default RUN_DIR/token_cache; a shared path to reuse it)
      index/<file key>.npz, .json            each local file's document index (doc_index.py), keyed by the file's
                                             path, size, modification time and a fingerprint of its head and tail:
                                             rebuilt only when the file changes. It never names the file: the
                                             reader supplies the path it is looking up
      seek/<unit key>/<documents>.json       positions in streamed sources (hub datasets, compressed files):
                                             `datasets`' state_dict after that many documents (streamed.py)
      blocks/<stream key>/<block>.tok, .json  block c of the mixed, shuffled document stream: its tokens (uint16,
                                             or int32 for vocabularies over 65535), and a record with the token
                                             count, a checksum and the source cursors at its start and end

The stream key covers everything a block's content depends on: the data plan's digest (sources, weights, fields,
split, tokenizer, block size, shuffling), the seed, and every source file's key, so a changed file starts a new
stream (its blocks are tokenized anew) while the indexes of unchanged files stay valid.

Like a checkpoint, an entry counts only once its record (.json) is written, last, by an atomic rename: a reader
never sees a half-written block. Every record is sealed with this user's secret cache key (cache_key.py): an HMAC
over the record, where it is stored (stream key and block number, file key, stream position) and the cache format.
A record whose seal does not hold (edited, written by someone without the key, copied under another name) or
whose tokens do not match its checksum is reported, counted, removed and tokenized again from the source. With
data.cache=off the blocks live in this process's memory only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from gptdist.data.cache_key import seal, verify
from gptdist.data.doc_index import DocIndex
from gptdist.errors import UserError

log = logging.getLogger("gptdist.data")


def cache_folder(data_cfg, run_dir: Path) -> Optional[Path]:
    """Where data.cache points: RUN_DIR/token_cache for 'run', None for 'off', else the folder given."""
    spec = data_cfg.cache
    if spec == "off":
        return None
    return Path(run_dir) / "token_cache" if spec == "run" else Path(spec).expanduser()


def node_folder(folder: Path) -> Path:
    """data.cache_scope=node: this node's own part of the cache folder."""
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
        self.stream_key = stream_key
        self.index_dir = self.root / "index"
        self.block_dir = self.root / "blocks" / stream_key
        self.rejected = 0  # indexes and positions whose seal did not hold (blocks: counted by their reader)
        # A folder shared by a group (group-writable, ideally setgid) gets group-writable sub-folders and files.
        self.shared = bool(self.root.is_dir() and self.root.stat().st_mode & 0o020)
        try:
            for folder in (self.index_dir, self.block_dir):
                folder.mkdir(parents=True, exist_ok=True)
                self._share(folder)
        except PermissionError as exc:
            raise UserError(f"token cache {self.root}: {exc.filename} is not writable by this user (made by another "
                            "user?); share the folder with a group (chmod -R g+ws, see docs/reliability.md) or "
                            "point data.cache at a folder of your own") from None

    def _share(self, path: Path) -> None:
        if self.shared:
            try:
                os.chmod(path, os.stat(path).st_mode | 0o020 | (0o2000 if path.is_dir() else 0))
            except OSError:
                pass  # made by another member of the group: it has set the bits already

    def _write(self, path: Path, data: bytes) -> None:
        _atomic_write(path, data)
        self._share(path)

    # ------------------------------------------------------------------------------------------------ indexes

    def load_index(self, key: str, path: str) -> Optional[DocIndex]:
        """The index of the file at `path` (the reader's own path: an index never names its file)."""
        meta_path = self.index_dir / f"{key}.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(self.index_dir / f"{key}.npz", allow_pickle=False) as arrays:
                starts, ends = arrays["starts"], arrays["ends"]
            mac = meta.pop("mac", None)
            if not verify(f"index|{key}", meta, mac, starts.astype(np.int64).tobytes() + ends.tobytes()):
                raise ValueError("its seal does not hold: edited, or not written with this user's cache key")
            return DocIndex(path, meta["mode"], starts, ends, meta["text_field"], meta["bad"], meta["bad_line"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("token cache: the document index %s is refused (%s); building it again", meta_path, exc)
            self.rejected += 1
            for p in (meta_path, self.index_dir / f"{key}.npz"):
                p.unlink(missing_ok=True)
            return None

    def save_index(self, key: str, index: DocIndex) -> int:
        """Writes the index; returns the bytes written."""
        arrays = index.to_arrays()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._write(self.index_dir / f"{key}.npz", buf.getvalue())
        record = index.meta()
        record["mac"] = seal(f"index|{key}", index.meta(), arrays["starts"].tobytes() + arrays["ends"].tobytes())
        meta = json.dumps(record)
        self._write(self.index_dir / f"{key}.json", meta.encode())
        return len(buf.getvalue()) + len(meta)

    # ------------------------------------------------------------------------- positions in streamed sources

    def save_seek(self, key: str, documents: int, position) -> None:
        folder = self.root / "seek" / key
        folder.mkdir(parents=True, exist_ok=True)
        record = {"documents": documents, "position": position}
        record["mac"] = seal(f"seek|{key}|{documents}", {"documents": documents, "position": position})
        self._write(folder / f"{documents:012d}.json", json.dumps(record).encode())

    def seeks(self, key: str):
        """(documents, datasets position) saved for a streamed unit; unreadable entries are skipped."""
        folder = self.root / "seek" / key
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
                mac = entry.pop("mac", None)
                if not verify(f"seek|{key}|{entry['documents']}", entry, mac):
                    self.rejected += 1
                    log.warning("token cache: the stream position %s is refused (its seal does not hold)", path)
                    continue
                out.append((int(entry["documents"]), entry["position"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return out

    # ------------------------------------------------------------------------------------------------- blocks

    def block_meta(self, c: int) -> Optional[dict]:
        """Block c's record once its seal holds (it binds the stream key and c: a record copied from another block
        or stream does not); {"damaged": True, "why": ...} otherwise."""
        path = self.block_dir / f"{c:09d}.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"damaged": True, "why": "its record is not valid JSON"}
        if not isinstance(meta, dict):
            return {"damaged": True, "why": "its record is not a JSON object"}
        mac = meta.pop("mac", None)
        if not verify(f"block|{self.stream_key}|{c}", meta, mac):
            return {"damaged": True, "why": "its seal does not hold: edited, moved, or not written with this user's "
                                            "cache key"}
        return meta

    def get_block(self, c: int) -> Tuple[Optional[np.ndarray], Optional[dict], Optional[str]]:
        """(tokens, record, problem): (None, None, None) when the block is not in the cache yet."""
        meta = self.block_meta(c)
        if meta is None:
            return None, None, None
        tok_path = self.block_dir / f"{c:09d}.tok"
        try:
            if meta.get("damaged"):
                raise ValueError(meta.get("why", "its record is damaged"))
            data = tok_path.read_bytes()
            if len(data) != meta["tokens"] * np.dtype(meta["dtype"]).itemsize:
                raise ValueError(f"{len(data)} bytes for {meta['tokens']} tokens")
            if checksum(data) != meta["checksum"]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.drop_block(c)
            return None, None, f"token cache block {c} in {self.block_dir} is damaged ({exc})"
        return np.frombuffer(data, dtype=meta["dtype"]).astype(np.int32), meta, None

    def put_block(self, c: int, tokens: np.ndarray, meta: dict) -> int:
        """Writes the block; returns the bytes written."""
        dtype = np.uint16 if int(tokens.max(initial=0)) < 2**16 else np.int32
        data = tokens.astype(dtype).tobytes()
        self._write(self.block_dir / f"{c:09d}.tok", data)
        record = {**meta, "block": c, "tokens": int(len(tokens)), "dtype": np.dtype(dtype).name,
                  "checksum": checksum(data)}
        record = json.loads(json.dumps(record))  # as it will be read back (tuples become lists)
        encoded = json.dumps({**record, "mac": seal(f"block|{self.stream_key}|{c}", record)}).encode()
        self._write(self.block_dir / f"{c:09d}.json", encoded)
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

    def load_index(self, key: str, path: str) -> Optional[DocIndex]:
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
