"""Train a tokenizer on the same sources the loader reads: a byte-level BPE (GPT-2's recipe), or characters.

BPE: the alphabet is all 256 bytes, so any text encodes without unknown tokens and decode(encode(x)) == x;
`<|endoftext|>` is a special token (id 0), the separator the loader puts after every document.

Characters (--char): one token per character of the sources, ids in sorted character order (0..n-1, as
character-level recipes number them), `<|endoftext|>` last (id n). A character the sources never held is dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptdist.data.config import DataConfig
from gptdist.data.reader import SourceReader
from gptdist.data.sources import resolve_sources
from gptdist.data.tokenizer import EOS_TOKEN, GPTTokenizer, byte_level, load_tokenizer
from gptdist.errors import UserError

MIN_VOCAB = 257  # 256 byte tokens + <|endoftext|>


def train_tokenizer(
    sources: Sequence[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    text_split: str = "document",
) -> GPTTokenizer:
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} (256 "
                        f"bytes + {EOS_TOKEN})")
    if not sources:
        raise UserError("tokenizer train: give at least one SOURCE (a file, glob, folder or pkg://package/glob)")
    seen = {"docs": 0}
    documents = _documents(sources, text_field, text_split, seen)
    tok = byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    if seen["docs"] == 0:
        raise UserError(f"tokenizer train: the sources {list(sources)} hold no non-empty document")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return load_tokenizer(str(out / "tokenizer.json"))


def train_char_tokenizer(sources: Sequence[str], out_dir: str | os.PathLike, *, text_field: str = "text",
                         text_split: str = "document") -> GPTTokenizer:
    """One token per character the sources hold, in sorted order, then <|endoftext|>."""
    if not sources:
        raise UserError("tokenizer train: give at least one SOURCE (a file, glob, folder or pkg://package/glob)")
    seen = {"docs": 0}
    chars: set = set()
    for batch in _documents(sources, text_field, text_split, seen):
        for doc in batch:
            chars.update(doc)
    if seen["docs"] == 0:
        raise UserError(f"tokenizer train: the sources {list(sources)} hold no non-empty document")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[EOS_TOKEN] = len(vocab)
    # A BPE without merges over the raw text: each character is its own token, nothing is pre-split or normalized.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([EOS_TOKEN])
    tok.decoder = decoders.Fuse()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return load_tokenizer(str(out / "tokenizer.json"))


def _documents(sources: Sequence[str], text_field: str, text_split: str, seen: dict) -> Iterator[List[str]]:
    cfg = DataConfig(sources=list(sources), text_field=text_field, text_split=text_split)  # type: ignore[arg-type]
    for src in resolve_sources(cfg):
        reader = SourceReader(src, "fail")
        for i in range(reader.n_units):
            for batch in reader.iter_unit(i):
                seen["docs"] += len(batch)
                yield batch
