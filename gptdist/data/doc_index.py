"""Where every document of a local file starts and ends, so that any document can be read without the ones before it.

A file's index is built once, by one pass that reads and splits it exactly as `datasets`' builders do (text:
`document` = the whole file, `paragraph` = split on blank lines, `line` = split on newlines, with universal
newlines; JSONL: one record per line, its text field; Parquet: its text column, row group by row group), dropping
the whitespace-only documents gptdist never trains on. It is then stored in the token cache, keyed by the file's
path, size and modification time, so it is rebuilt only when the file changes, and shared by every rank and run.

    uncompressed text and JSONL   byte range [start, end) of each document: reading one is one positioned read
    text with carriage returns    character ranges of the newline-translated text (the file is read whole)
    JSON array files              one whole-file parse per read (rare; use JSONL for large data)
    Parquet                       (row group, row) of each document: reading reads only that row group's column

Compressed files and hub datasets cannot be read from the middle; they are not indexed (reader.py streams them).
A file that cannot be read is a BadFile when its index is built, with the same reasons and line numbers as the
streaming reader gives, so every rank sees the same bad files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from gptdist.data.reader import BadFile, find_bad_json_line
from gptdist.data.sources import SourceFile, is_compressed

INDEX_VERSION = 2
_CHUNK = 16 << 20  # bytes read per step while indexing (then up to the end of the line)


def indexable(f: SourceFile) -> bool:
    return not is_compressed(f.path)


_FINGERPRINT = 64 << 10  # bytes of a file's head and of its tail in its fingerprint


def fingerprint(path: str, size: int) -> str:
    """SHA-256 of a file's first and last 64 KiB: a file rewritten with the same size and modification time is
    still noticed where its head or tail changed (the seal of the cached records covers the rest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(_FINGERPRINT))
        if size > _FINGERPRINT:
            fh.seek(max(_FINGERPRINT, size - _FINGERPRINT))
            digest.update(fh.read(_FINGERPRINT))
    return digest.hexdigest()[:32]


def file_key(f: SourceFile, text_split: str, text_field: str) -> str:
    """Changes whenever the file (its real path, size, modification time, head and tail) or the way it is cut into
    documents does."""
    st = os.stat(f.path)
    blob = (f"{INDEX_VERSION}|{os.path.realpath(f.path)}|{st.st_size}|{st.st_mtime_ns}|"
            f"{fingerprint(f.path, st.st_size)}|{f.kind}|{text_split}|{text_field}")
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _blank(part: bytes) -> bool:
    """Whitespace only (as str.isspace), for a piece of valid UTF-8."""
    if not part.strip():
        return True
    return not part.isascii() and part.decode("utf-8").isspace()


@dataclass
class DocIndex:
    path: str
    mode: str  # "bytes" | "chars" | "json-array" | "parquet" | "bad"
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # bytes/chars, or row groups
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # bytes/chars, or rows
    text_field: str = "text"
    bad: Optional[str] = None  # why the file cannot be read (mode "bad")
    bad_line: Optional[int] = None
    _text: Optional[object] = field(default=None, repr=False, compare=False)  # whole-file content, when needed

    @property
    def n_docs(self) -> int:
        return int(len(self.starts))

    def read(self, lo: int, hi: int) -> List[str]:
        """Documents lo..hi-1 of the file, as the streaming reader yields them."""
        if hi <= lo:
            return []
        if self.mode == "bytes":
            return self._read_bytes(lo, hi)
        if self.mode == "chars":
            text = self._whole_text()
            return [text[a:b] for a, b in zip(self.starts[lo:hi].tolist(), self.ends[lo:hi].tolist())]
        if self.mode == "json-array":
            docs = self._whole_text()
            return docs[lo:hi]
        if self.mode == "parquet":
            return self._read_parquet(lo, hi)
        raise ValueError(f"{self.path} is not readable ({self.bad})")

    def _read_bytes(self, lo: int, hi: int) -> List[str]:
        a, b = int(self.starts[lo]), int(self.ends[hi - 1])
        with open(self.path, "rb", buffering=0) as fh:
            data = os.pread(fh.fileno(), b - a, a)
        out = []
        for s, e in zip(self.starts[lo:hi].tolist(), self.ends[lo:hi].tolist()):
            piece = data[s - a : e - a]
            if self.text_field is not None and piece[:1] == b"{":  # JSONL record
                out.append(json.loads(piece)[self.text_field])
            else:
                out.append(piece.decode("utf-8"))
        return out

    def _whole_text(self):
        if self._text is None:
            with open(self.path, encoding="utf-8") as fh:  # universal newlines, as datasets reads text
                content = fh.read()
            if self.mode == "json-array":
                content = [r[self.text_field] for r in json.loads(content) if _text_of(r, self.text_field)]
            self._text = content
        return self._text

    def _read_parquet(self, lo: int, hi: int) -> List[str]:
        # pyarrow: slow to import, only for parquet files
        import pyarrow.parquet as pq

        groups, rows = self.starts[lo:hi].tolist(), self.ends[lo:hi].tolist()
        pf = pq.ParquetFile(self.path)
        out: List[str] = []
        cache: Dict[int, list] = {}
        for g, r in zip(groups, rows):
            if g not in cache:
                cache.clear()
                cache[g] = pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
            out.append(cache[g][r])
        return out

    # ------------------------------------------------------------------------------------------------ storage

    def to_arrays(self) -> Dict[str, np.ndarray]:
        return {"starts": self.starts.astype(np.int64), "ends": self.ends.astype(np.int64)}

    def meta(self) -> dict:
        return {"version": INDEX_VERSION, "mode": self.mode, "text_field": self.text_field,
                "bad": self.bad, "bad_line": self.bad_line, "documents": self.n_docs}


def _text_of(record, field_name: str) -> bool:
    return isinstance(record, dict) and isinstance(record.get(field_name), str) and bool(record[field_name].strip())


def build_index(f: SourceFile, text_split: str, text_field: str) -> DocIndex:
    """One reading pass over the file. A problem is returned as an index of mode "bad" (the caller decides, by
    data.on_bad_file, whether that stops the run or skips the file)."""
    try:
        if f.kind == "parquet":
            return _index_parquet(f.path, text_field)
        if f.kind == "json":
            return _index_jsonl(f.path, text_field)
        return _index_text(f.path, text_split)
    except BadFile as bad:
        return DocIndex(f.path, "bad", text_field=text_field, bad=bad.reason, bad_line=bad.line)
    except OSError as exc:
        return DocIndex(f.path, "bad", text_field=text_field, bad=f"cannot be read ({exc.strerror or exc})")


def _chunks(path: str):
    """(offset, bytes) pieces of the file, each ending at a newline (or the end of the file)."""
    with open(path, "rb") as fh:
        offset = 0
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return
            chunk += fh.readline()
            yield offset, chunk
            offset += len(chunk)


def _check_utf8(chunk: bytes, offset: int) -> None:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFile(f"is not UTF-8 (byte 0x{chunk[exc.start]:02x} at offset {offset + exc.start})") from None


def _index_text(path: str, split: str) -> DocIndex:
    starts: List[int] = []
    ends: List[int] = []
    if split == "document":
        with open(path, "rb") as fh:
            data = fh.read()
        _check_utf8(data, 0)
        if b"\r" in data:
            return _index_translated(path, split)
        if not _blank(data):
            starts, ends = [0], [len(data)]
        return DocIndex(path, "bytes", np.array(starts, np.int64), np.array(ends, np.int64), text_field=None)
    sep = b"\n\n" if split == "paragraph" else b"\n"
    carry, carry_at = b"", 0
    for offset, chunk in _chunks(path):
        _check_utf8(chunk, offset)
        if b"\r" in chunk:
            return _index_translated(path, split)
        data = carry + chunk
        base = offset - len(carry)
        parts = data.split(sep)
        carry = parts.pop()  # may continue in the next chunk
        pos = base
        for part in parts:
            if not _blank(part):
                starts.append(pos)
                ends.append(pos + len(part))
            pos += len(part) + len(sep)
        carry_at = pos
    if carry and not _blank(carry):
        starts.append(carry_at)
        ends.append(carry_at + len(carry))
    return DocIndex(path, "bytes", np.array(starts, np.int64), np.array(ends, np.int64), text_field=None)


def _index_translated(path: str, split: str) -> DocIndex:
    """A text file with carriage returns: documents as character ranges of its newline-translated text."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    starts: List[int] = []
    ends: List[int] = []
    if split == "document":
        if text.strip():
            starts, ends = [0], [len(text)]
    else:
        sep = "\n\n" if split == "paragraph" else "\n"
        pos = 0
        for part in text.split(sep):
            if part.strip():
                starts.append(pos)
                ends.append(pos + len(part))
            pos += len(part) + len(sep)
    return DocIndex(path, "chars", np.array(starts, np.int64), np.array(ends, np.int64), text_field=None)


def _index_jsonl(path: str, text_field: str) -> DocIndex:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):  # a JSON array file, not JSON lines
        idx = DocIndex(path, "json-array", text_field=text_field)
        docs = idx._whole_text()
        idx.starts = np.arange(len(docs), dtype=np.int64)
        idx.ends = idx.starts + 1
        return idx
    starts: List[int] = []
    ends: List[int] = []
    line_no = 0
    for offset, chunk in _chunks(path):
        _check_utf8(chunk, offset)
        pos = offset
        for line in chunk.split(b"\n"):
            if pos >= offset + len(chunk):
                break
            line_no += 1
            stripped = line.strip()
            if stripped:
                try:
                    record = json.loads(stripped)
                except ValueError:
                    found = find_bad_json_line(path, text_field)
                    raise BadFile(found[1] if found else "is not valid JSON",
                                  line=found[0] if found else line_no) from None
                value = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    found = find_bad_json_line(path, text_field)
                    raise BadFile(found[1], line=found[0]) if found else BadFile(
                        f"has a record whose {text_field!r} field is missing or not text", line=line_no)
                if value and not value.isspace():
                    lead = len(line) - len(line.lstrip())
                    starts.append(pos + lead)
                    ends.append(pos + lead + len(stripped))
            pos += len(line) + 1
    return DocIndex(path, "bytes", np.array(starts, np.int64), np.array(ends, np.int64), text_field=text_field)


def _index_parquet(path: str, text_field: str) -> DocIndex:
    # pyarrow: slow to import, only for parquet files
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for an unreadable file
        raise BadFile(f"is not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if text_field not in names:
        raise BadFile(f"has no {text_field!r} column (columns: {', '.join(names)})")
    groups: List[int] = []
    rows: List[int] = []
    for g in range(pf.num_row_groups):
        texts = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        for r, t in enumerate(texts):
            if not isinstance(t, str):
                raise BadFile(f"has a record whose {text_field!r} field is missing or not text")
            if t and not t.isspace():
                groups.append(g)
                rows.append(r)
    return DocIndex(path, "parquet", np.array(groups, np.int64), np.array(rows, np.int64), text_field=text_field)
