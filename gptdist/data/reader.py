"""Read one source's documents file by file through `datasets` streaming, attributing every failure to its file.

Per file kind there is one `load_dataset(builder, data_files=files, streaming=True)` per process, and file i is
read as its shard i: one dataset object per file would cost a builder set-up (and a hub download-count ping) per
file and per epoch. Whitespace-only documents are dropped here, so every document downstream has text.

A bad file (unreadable, not UTF-8, broken JSON, a JSONL line without the text field, an unreadable Parquet file)
is a UserError naming the file (and line) with on_bad_file='fail'. With 'skip' it is reported once through
`report(path, reason)` and left out of every epoch; in skip mode text files are validated before any of their
documents is used, so a skipped file contributes nothing. Later problems found mid-file (broken JSON) end the file
there; every process reads the same bytes, so that is still deterministic.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from gptdist.data.sources import ResolvedSource, is_compressed
from gptdist.errors import UserError

log = logging.getLogger("gptdist.data")

ReportFn = Callable[[str, str], None]
_ITER_BATCH = 512
_PING_LOCK = threading.Lock()


def log_skipped(path: str, reason: str) -> None:
    log.warning("skipping bad data file %s: %s (data.on_bad_file=skip)", path, reason)


class BadFile(Exception):
    def __init__(self, reason: str, line: Optional[int] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


class SourceReader:
    """Documents of one source's files (or its hub dataset, unit 0), as lists of non-empty strings."""

    def __init__(self, src: ResolvedSource, on_bad_file: str = "fail", report: Optional[ReportFn] = None) -> None:
        self.src = src
        self.on_bad_file = on_bad_file
        self.report = report or log_skipped
        self.bad: Dict[int, str] = {}  # file index -> reason, for files skipped in this process
        self._validated: set = set()
        self._by_kind: Dict[str, Any] = {}
        self._position: List[Tuple[str, int]] = []
        counts: Dict[str, int] = {}
        for f in src.files:
            self._position.append((f.kind, counts.get(f.kind, 0)))
            counts[f.kind] = counts.get(f.kind, 0) + 1

    @property
    def n_units(self) -> int:
        return self.src.n_units

    def unit_name(self, i: int) -> str:
        return self.src.hub[0] if self.src.hub is not None else self.src.files[i].path

    def iter_unit(self, i: int) -> Iterator[List[str]]:
        """Non-empty documents of file i in order, in batches; nothing for a file skipped as bad."""
        if i in self.bad:
            return
        try:
            if self.on_bad_file == "skip" and i not in self._validated and self.src.hub is None:
                validate_file(self.src.files[i].path, self.src.files[i].kind, self.src.text_field)
                self._validated.add(i)
            yield from self._read(i)
        except BadFile as bad:
            self.bad_file(i, bad)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets/pyarrow/fsspec raise many types; all mean "this file cannot be read"
            self.bad_file(i, self._explain(i, exc))

    # -- reading ------------------------------------------------------------------------------------------------

    def _read(self, i: int) -> Iterator[List[str]]:
        yield from self.docs_of(self.dataset(i), i)

    def dataset(self, i: int) -> Any:
        """The `datasets` IterableDataset of unit i (streamed.py loads positions into it)."""
        return self._hub() if self.src.hub is not None else self._shard(i)

    def docs_of(self, ds: Any, i: int) -> Iterator[List[str]]:
        """Non-empty documents of unit i's dataset, batch by batch; BadFile for a record without text."""
        field = self.src.text_field
        for batch in ds.iter(batch_size=_ITER_BATCH):
            texts = batch.get(field)
            if texts is None or not all(type(t) is str for t in texts):
                raise self._explain(i, None, fields=sorted(batch))
            docs = [t for t in texts if t and not t.isspace()]
            if docs:
                yield docs

    def _shard(self, i: int) -> Any:
        kind, pos = self._position[i]
        ds = self._by_kind.get(kind)
        if ds is None:
            paths = [f.path for f in self.src.files if f.kind == kind]
            try:
                ds = self._load(kind, paths)
            except Exception:  # noqa: BLE001 - e.g. a file name datasets reads as a pattern: load file by file, blame the right one
                ds = False
            self._by_kind[kind] = ds
        if ds is False:  # datasets did not give one shard per file: fall back to a dataset per file
            return self._load(kind, [self.src.files[i].path])
        return ds.shard(num_shards=ds.num_shards, index=pos)

    def _load(self, kind: str, paths: List[str]) -> Any:
        # datasets: slow to import, only for sources that need it
        from datasets import load_dataset

        kwargs: Dict[str, Any] = {}
        if kind == "text":
            kwargs["sample_by"] = self.src.text_split
        elif kind == "parquet":
            kwargs["columns"] = [self.src.text_field]
        with _no_hub_ping():
            ds = load_dataset(kind, data_files=paths, streaming=True, split="train", **kwargs)
        if len(paths) > 1 and ds.num_shards != len(paths):
            return False
        return ds

    def _hub(self) -> Any:
        ds = self._by_kind.get("hub")
        if ds is None:
            # datasets: slow to import, only for hub sources
            from datasets import load_dataset

            name, config, split, revision = self.src.hub  # type: ignore[misc]
            pinned = {"revision": revision} if revision else {}
            ds = self._by_kind["hub"] = load_dataset(name, config, split=split, streaming=True, **pinned)
        return ds

    # -- failures -----------------------------------------------------------------------------------------------

    def _explain(self, i: int, exc: Optional[BaseException], fields: Optional[List[str]] = None) -> BadFile:
        f = self.src.files[i] if self.src.hub is None else None
        if f is not None and f.kind == "json" and not is_compressed(f.path):
            found = find_bad_json_line(f.path, self.src.text_field)
            if found is not None:
                return BadFile(found[1], line=found[0])
        if f is not None:
            try:  # precise reasons (file offset of a bad byte, a missing Parquet column) beat the library's message
                validate_file(f.path, f.kind, self.src.text_field)
            except BadFile as bad:
                return bad
        if exc is None:
            known = f" (fields: {', '.join(fields)})" if fields else ""
            return BadFile(f"has a record whose {self.src.text_field!r} field is missing or not text{known}")
        if isinstance(exc, UnicodeDecodeError):
            return BadFile(f"is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} of a chunk)")
        first = (str(exc).splitlines() or [""])[0][:300]
        return BadFile(f"cannot be read ({type(exc).__name__}: {first})")

    def bad_file(self, i: int, bad: BadFile) -> None:
        name = self.unit_name(i)
        if self.src.hub is not None:
            raise UserError(
                f"{self.src.describe()} is not a local file, folder or glob, and reading it as a `datasets` hub "
                f"dataset failed: {bad.reason}; fix the path, or the dataset's name/split and the network access"
            )
        # A source that is one file is named once; a folder or glob names the file inside it.
        parts = [] if str(name) == str(self.src.spec_path) else [f"file {name}"]
        parts += [f"line {bad.line}"] if bad.line is not None else []
        where = " ".join(parts + [""])
        if self.on_bad_file == "fail":
            raise UserError(
                f"{self.src.describe()}: {where}{bad.reason}; fix or remove the file, "
                "or set data.on_bad_file=skip to skip it with a warning"
            )
        self.bad[i] = bad.reason
        self.report(name, (f"line {bad.line}: " if bad.line is not None else "") + bad.reason)


def validate_file(path: str, kind: str, text_field: str, *, max_bytes: Optional[int] = None) -> None:
    """Raise BadFile if the file cannot be opened, is not UTF-8, or (Parquet) lacks the text column.

    Reads the whole file (or its first max_bytes) with an incremental decoder: fast next to tokenizing it.
    """
    if kind == "parquet":
        try:
            # pyarrow: slow to import, only for parquet files
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for an unreadable file
            raise BadFile(f"is not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
        if text_field not in names:
            raise BadFile(f"has no {text_field!r} column (columns: {', '.join(names)})")
        return
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise BadFile(f"cannot be read ({exc.strerror or exc})") from None
    if is_compressed(path):
        fh.close()
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with fh:
        while max_bytes is None or offset < max_bytes:
            try:
                chunk = fh.read(4 << 20)
            except OSError as exc:  # a device, a file on a failing disk, /proc/self/mem
                raise BadFile(f"cannot be read ({exc.strerror or exc})") from None
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset + exc.start
                raise BadFile(f"is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {at})") from None
            if not chunk:
                break
            offset += len(chunk)


def find_bad_json_line(
    path: str, field: str, *, max_lines: Optional[int] = None
) -> Optional[Tuple[Optional[int], str]]:
    """The first JSONL line (1-based) that is not an object with a string `field`, and why; None if all are fine.

    Only called on the slow path (a problem was seen, or check_data's bounded look at the first lines).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if max_lines is not None and n > max_lines:
                    return None
                if not line.strip():
                    continue
                if n == 1 and line.lstrip().startswith("["):
                    return None  # a JSON array file, not JSON lines: no per-line attribution
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    return n, f"is not valid JSON ({getattr(exc, 'msg', exc)})"
                if not isinstance(obj, dict) or field not in obj or obj[field] is None:
                    return n, (f"has no {field!r} field (set data.text_field or the source's text_field to the key "
                               "that holds the text)")
                if not isinstance(obj[field], str):
                    return n, f"has a {type(obj[field]).__name__} in {field!r}, not text"
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 (byte 0x{exc.object[exc.start]:02x})"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    return None


@contextlib.contextmanager
def _no_hub_ping() -> Iterator[None]:
    # load_dataset() of a packaged builder sends a HEAD request to count downloads (3 s timeout). Local files have
    # nothing to count, and on a cluster without egress each call would stall, so it is off while we load them.
    import datasets.config as dconfig

    with _PING_LOCK:
        old = dconfig.HF_UPDATE_DOWNLOAD_COUNTS
        dconfig.HF_UPDATE_DOWNLOAD_COUNTS = False
        try:
            yield
        finally:
            dconfig.HF_UPDATE_DOWNLOAD_COUNTS = old
