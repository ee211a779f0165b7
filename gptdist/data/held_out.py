"""Held-out text for evaluation, read one way everywhere: `gptdist eval` and the validation loss during training.

The text is read as training reads one source with no shuffling (files in sorted order, documents in file order,
each followed by EOS) and cut into the same non-overlapping seq_len+1 windows, so the windows equal
`gptdist.data.iter_samples` with shuffle_buffer=0 and window_shuffle=0. Unlike training, one pass only: the source is
not repeated, and a last window shorter than seq_len+1 tokens is left out (every sample is scored on a full context).
A limit of N windows takes N evenly strided over the whole pass (spread_windows), not the first N.
"""

from __future__ import annotations

from typing import Iterator, List

from gptdist.data.config import DataConfig, SourceSpec
from gptdist.data.reader import SourceReader
from gptdist.data.sources import resolve_sources
from gptdist.errors import UserError


def held_out_config(source, tokenizer: str, text_field: str, text_split: str) -> DataConfig:
    """source: a path/glob/folder/hub name, or a SourceSpec (its own text_field, hub config and split)."""
    spec = source if isinstance(source, SourceSpec) else SourceSpec(path=str(source))
    return DataConfig(sources=[spec], tokenizer=tokenizer, shuffle_buffer=0, window_shuffle=0,
                      text_field=text_field,
                      text_split=text_split, on_bad_file="fail")


def windows(data_cfg: DataConfig, tok, seq_len: int, key: str = "--data") -> Iterator[List[int]]:
    """The seq_len+1 token windows of one pass over the source. key: how the user named the source."""
    # numpy: only when windows are read; `gptdist check` imports this module and stays without numpy
    import numpy as np

    from gptdist.data.blocks import tokenize_block

    try:
        (src,) = resolve_sources(data_cfg)
    except UserError as err:
        raise _named(err, key) from None
    reader = SourceReader(src, data_cfg.on_bad_file)
    width = seq_len + 1
    pending = np.empty(0, dtype=np.int32)
    for unit in range(reader.n_units):
        for docs in reader.iter_unit(unit):
            pending = np.concatenate([pending, tokenize_block(tok, docs)])
            n = len(pending) // width
            for k in range(n):
                yield pending[k * width : (k + 1) * width].tolist()
            pending = pending[n * width :]


def spread_windows(data_cfg: DataConfig, tok, seq_len: int, count: int, key: str) -> List[List[int]]:
    """`count` windows evenly strided over the whole pass: window floor(j * N / count) for j < count (N windows in
    all; every window when N <= count). So validation estimates the whole held-out text, not where it starts. One
    pass, holding the held-out tokens (4 bytes each) while it picks."""
    # numpy: only when windows are spread; `gptdist check` stays without numpy
    import numpy as np

    rows = [np.asarray(w, dtype=np.int32) for w in windows(data_cfg, tok, seq_len, key)]
    if not rows:
        raise UserError(f"{key}: fewer than seq_len+1={seq_len + 1} tokens of text; nothing to evaluate on a full "
                        "context")
    n = len(rows)
    picks = range(n) if n <= count else [(j * n) // count for j in range(count)]
    return [rows[i].tolist() for i in picks]


def check_source(source, tokenizer: str, text_field: str, text_split: str, key: str) -> None:
    """Before any process group: the source resolves (files exist, the hub name is well formed)."""
    try:
        resolve_sources(held_out_config(source, tokenizer, text_field, text_split))
    except UserError as err:
        raise _named(err, key) from None


def _named(err: UserError, key: str) -> UserError:
    """The data module names the config key data.sources[0]; here the user named the source as `key`."""
    return UserError(str(err).replace("data.sources[0].path", key).replace("data.sources[0]", key))
