"""Shared by the data tests: a synthetic corpus the tests write, a tiny BPE trained on it, and an independent
reference for the token stream (documents read with plain Python, encoded one by one, EOS appended)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterable, List

WORDS = (
    "the king queen lord lady sword crown night day love death blood honour fool ghost castle storm sea "
    "café naïve übermaß señor 日本 язык λόγος 🙂 O! — 'tis thou art hath doth"
).split()


def paragraph(rng: random.Random, marker: str = "") -> str:
    lines = []
    for _ in range(rng.randint(1, 3)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    text = "\n".join(lines)
    return f"{marker} {text}" if marker else text


def write_text_files(folder: Path, n_files: int, paras_per_file: int, seed: int = 0, marker: str = "") -> List[Path]:
    """Plain-text files of paragraphs separated by blank lines (some padded with extra blank lines)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        paras = [paragraph(rng, marker) for _ in range(paras_per_file)]
        path = folder / f"part-{f:02d}.txt"
        path.write_text("\n\n".join(paras) + "\n\n\n", encoding="utf-8")
        paths.append(path)
    return paths


def write_jsonl(path: Path, texts: Iterable[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def text_documents(paths: Iterable[Path], split: str) -> List[str]:
    """Documents of plain-text files, in file order: whole file, blank-line paragraphs, or lines; blank ones dropped."""
    docs: List[str] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if split == "document":
            parts = [text]
        elif split == "paragraph":
            parts = text.split("\n\n")
        else:
            parts = text.split("\n")
        docs.extend(p for p in parts if p.strip())
    return docs


def token_stream(tok, docs: Iterable[str]) -> List[int]:
    out: List[int] = []
    for doc in docs:
        out.extend(tok.encode(doc))
        out.append(tok.eos_id)
    return out


def split_on_eos(stream: List[int], eos: int) -> List[List[int]]:
    docs, cur = [], []
    for t in stream:
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def data_cfg(tiny: Dict[str, object], **overrides: object):
    """A DataConfig over the tiny corpus, cut into paragraphs; windows in stream order unless told."""
    from gptdist.data import DataConfig

    values: Dict[str, object] = {
        "sources": [str(tiny["corpus"])], "tokenizer": tiny["tokenizer"], "text_split": "paragraph",
        "shuffle_buffer": 8, "window_shuffle": 0,
    }
    values.update(overrides)
    return DataConfig(**values)
