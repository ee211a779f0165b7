"""Sources that cannot be indexed (hub datasets, compressed files): read forward, seek by saved positions, retry.

A streamed unit (a compressed file, or a whole hub dataset) is read through `datasets` streaming, batch by batch,
holding only a window of the documents around the reading position (never the unit). To find document n without
reading the n before it, every few thousand documents the reader saves `datasets`' own iterable position
(`IterableDataset.state_dict()`: the shard and the example inside it) in the token cache, next to the document count
it stands for. A resume, or another worker starting further on, loads the newest saved position at or before the
document it needs and reads forward from there: a resume at document 10^9 costs what one at 10^4 does.

Hub streaming crosses a network: a transient error (connection, timeout, HTTP 5xx, ...) is retried with backoff
from the last position read, up to `data.hub_retries` times, then ends the run with one error naming the source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

from gptdist.data.doc_index import file_key
from gptdist.data.reader import BadFile, SourceReader
from gptdist.data.sources import ResolvedSource
from gptdist.errors import UserError

log = logging.getLogger("gptdist.data")
SEEK_EVERY = 4096  # documents between saved positions: a seek reads at most this many documents again
_TRANSIENT_MODULES = ("requests", "urllib3", "httpx", "httpcore", "aiohttp", "fsspec", "huggingface_hub", "http")


def unit_key(src: ResolvedSource, i: int) -> str:
    """Names one streamed unit's saved positions in the cache."""
    if src.hub is not None:
        what = ["hub", *map(str, src.hub), src.text_field]
    else:
        what = ["file", file_key(src.files[i], src.text_split, src.text_field)]
    return hashlib.sha256("|".join(what).encode()).hexdigest()[:24]


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble, not a bad dataset."""
    if isinstance(exc, (BadFile, UserError, UnicodeDecodeError, KeyError, ValueError, TypeError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES or isinstance(exc, OSError)


class StreamedUnit:
    """Documents of unit i, by position, from a forward reader that keeps a bounded window of them."""

    def __init__(self, reader: SourceReader, i: int, cache, keep: int, retries: int = 5, backoff_s: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.reader, self.i, self.cache = reader, i, cache
        self.keep = max(keep, 1)
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self.key = unit_key(reader.src, i)
        self.hub = reader.src.hub is not None
        self.base = 0  # position of self.buf[0]
        self.floor = 0  # documents before this one are not needed any more
        self.buf: List[str] = []
        self.done = False
        self._it: Optional[Iterator[Tuple[List[str], Any]]] = None
        self._initial: Any = None  # the dataset's position before its first document
        self._state: Tuple[int, Any] = (0, None)  # (documents, datasets position) at the last batch end
        self._saved_at = 0

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def at_least(self, n: int, floor: int) -> int:
        """min(n, documents in the unit), reading forward only as far as needed; documents before `floor` will not
        be asked for again (they may be dropped)."""
        self.floor = floor  # first: a seek reads forward from here and must not drop what is asked for
        if floor < self.base:
            self._seek(floor)
        while self.end < n and not self.done:
            self._more()
        return min(n, self.end)

    def read(self, lo: int, hi: int) -> List[str]:
        self.at_least(hi, lo)
        return self.buf[lo - self.base:hi - self.base]

    # -- reading ------------------------------------------------------------------------------------------------

    def _more(self) -> None:
        if self._it is None:  # the first read, or after a seek: start at the first document still needed
            self._open(self.floor)
        attempt = 0
        while True:
            try:
                docs, position = next(self._it)
                break
            except StopIteration:
                self.done = True
                return
            except BaseException as exc:  # noqa: BLE001 - sorted into transient and not below
                if not (self.hub and is_transient(exc)):
                    self._fail(exc)
                    return
                attempt += 1
                if attempt > self.retries:
                    raise UserError(
                        f"{self.reader.src.describe()}: streaming the hub dataset failed {attempt} times in a row "
                        f"(last: {type(exc).__name__}: {str(exc)[:200]}); check this machine's access to the hub "
                        f"(or raise data.hub_retries); the run resumes from its last checkpoint"
                    ) from None
                wait = self.backoff_s * 2 ** (attempt - 1)
                log.warning("%s: %s while streaming (%s); retry %d of %d in %.0f s", self.reader.src.describe(),
                            type(exc).__name__, str(exc)[:200], attempt, self.retries, wait)
                self.sleep(wait)
                self._reopen_at(self.end)
        self.buf.extend(docs)
        self._state = (self.end, position)
        if self.floor - self.base > self.keep:  # bounded memory: drop what will not be asked for again
            drop = min(self.floor - self.base, len(self.buf))
            del self.buf[:drop]
            self.base += drop
        if position is not None and self.end - self._saved_at >= SEEK_EVERY:
            self.cache.save_seek(self.key, self.end, position)
            self._saved_at = self.end

    def _fail(self, exc: BaseException) -> None:
        """A bad unit: a UserError naming it (data.on_bad_file=fail), or the unit ends here, reported once."""
        if isinstance(exc, UserError):
            raise exc
        self.reader.bad_file(self.i, exc if isinstance(exc, BadFile) else self.reader._explain(self.i, exc))
        self.done = True

    def _batches(self, ds: Any) -> Iterator[Tuple[List[str], Any]]:
        for docs in self.reader.docs_of(ds, self.i):
            yield docs, _position(ds)

    def _open(self, target: int) -> None:
        """Start reading at document `target`: from the newest saved position at or before it."""
        if self.i in self.reader.bad:  # skipped as bad earlier in this process: it has no documents
            self._it, self.base, self.buf, self.done = iter(()), target, [], True
            return
        best = (0, None)
        for pos, state in self.cache.seeks(self.key):
            if best[0] < pos <= target:
                best = (pos, state)
        if self._state[1] is not None and best[0] < self._state[0] <= target:
            best = self._state
        self._start(best, target)

    def _reopen_at(self, target: int) -> None:
        """After a transient error: a new stream from the position of the last batch read (or, for a dataset
        without positions, from its start), keeping the documents already held."""
        base, buf = self.base, self.buf
        best = self._state if self._state[0] <= target and self._state[1] is not None else (0, None)
        self._start(best, target)
        self.base, self.buf = base, buf + self.buf  # _start left the documents from `target` on

    def _start(self, at: Tuple[int, Any], target: int) -> None:
        pos, state = at
        ds = self.reader.dataset(self.i)  # the hub dataset object is reused: always set where it starts
        if self._initial is None:
            self._initial = _position(ds)
        if state is None:
            state = self._initial
        if state is not None:
            ds.load_state_dict(state)
        self._it = self._batches(ds)
        self.base, self.buf = pos, []
        self.done = False
        while self.end < target and not self.done:  # documents between the saved position and the target
            self._more()
        if self.end > target:
            cut = self.end - target
            keep = self.buf[-cut:]
            self.base, self.buf = target, keep

    def _seek(self, n: int) -> None:
        self._it = None
        self._state = (0, None) if self._state[0] > n else self._state
        self._open(n)


def _position(ds: Any) -> Any:
    try:
        return json.loads(json.dumps(ds.state_dict()))  # a plain copy: datasets keeps mutating its own
    except Exception:  # noqa: BLE001 - a dataset without positions is still readable, only not seekable
        return None
