"""check_data: everything about the data that can be found wrong before training starts, as one-line UserErrors.

Cheap by design: it resolves every path, loads the tokenizer, compares vocabularies, validates the first files of
each source (UTF-8, Parquet schema, the first JSONL lines) and reads up to the first non-empty document of each
source. Problems in later files are still reported, with file and line, by the streaming reader when it gets there.
"""

from __future__ import annotations

import json

from gptdist.data.config import DataConfig
from gptdist.data.reader import BadFile, SourceReader, find_bad_json_line, validate_file
from gptdist.data.sources import ResolvedSource, is_compressed, resolve_sources
from gptdist.data.tokenizer import GPTTokenizer, load_tokenizer
from gptdist.errors import UserError

_CHECK_FILES = 8  # files per source validated up front
_CHECK_BYTES = 64 << 20  # bytes per file validated up front
_CHECK_LINES = 2000  # JSONL lines per file checked for the text field


def check_data(cfg: DataConfig, model_vocab_size: int) -> GPTTokenizer:
    sources = resolve_sources(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > model_vocab_size:
        suggested = -(-tok.vocab_size // 64) * 64
        raise UserError(
            f"data.tokenizer={cfg.tokenizer!r} has {tok.vocab_size} tokens but model.vocab_size={model_vocab_size}: "
            f"raise model.vocab_size to at least {tok.vocab_size} (e.g. model.vocab_size={suggested})"
        )
    for src in sources:
        _check_source(src, cfg.on_bad_file)
    return tok


def _has_document(f, text_field: str):
    """Whether a plain-text or JSONL file holds a non-blank document, read directly (no `datasets`, so a check stays
    a fraction of a second); None for the kinds only `datasets` reads (Parquet, compressed, JSON arrays)."""
    if is_compressed(f.path) or f.kind not in ("text", "json"):
        return None
    try:
        with open(f.path, encoding="utf-8") as fh:
            if f.kind == "text":
                while True:
                    chunk = fh.read(1 << 20)
                    if not chunk:
                        return False
                    if not chunk.isspace():
                        return True
            for n, line in enumerate(fh):
                if n == 0 and line.lstrip().startswith("["):
                    return None
                if not line.strip():
                    continue
                text = json.loads(line).get(text_field)
                if isinstance(text, str) and text.strip():
                    return True
            return False
    except (OSError, ValueError, AttributeError):
        return None  # the reader gives the precise reason


def _check_source(src: ResolvedSource, on_bad_file: str) -> None:
    reader = SourceReader(src, on_bad_file)
    for i, f in enumerate(src.files[:_CHECK_FILES]):
        try:
            validate_file(f.path, f.kind, src.text_field, max_bytes=_CHECK_BYTES)
            if f.kind == "json" and not is_compressed(f.path):
                found = find_bad_json_line(f.path, src.text_field, max_lines=_CHECK_LINES)
                if found is not None:
                    raise BadFile(found[1], line=found[0])
        except BadFile as bad:
            reader.bad_file(i, bad)  # a UserError in fail mode; a warning and a skip in skip mode
    for i in range(reader.n_units):
        if i in reader.bad:
            continue
        found = _has_document(src.files[i], src.text_field) if src.hub is None else None
        if found:
            return
        if found is None:  # cannot tell without reading it as training does
            for _ in reader.iter_unit(i):
                return  # a non-empty document exists
    bad = f" ({len(reader.bad)} bad file(s) skipped)" if reader.bad else ""
    raise UserError(
        f"{src.describe()}: empty source, no non-empty document in its {reader.n_units} file(s){bad}; "
        "point it at data with text"
    )
