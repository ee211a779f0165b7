"""Tokenizers: GPT-2's from the installed package, a trained byte-level BPE, and the transformers export."""

from __future__ import annotations

import json

import pytest

from gptdist.data import load_tokenizer, train_tokenizer
from gptdist.errors import UserError
from tests.data_helpers import text_documents

TRICKY = [
    "Hello world",
    "  leading spaces,\ttabs\nand\r\nnewlines  ",
    "café naïve 日本語 🙂 — ½",
    "a<|endoftext|>b",
    "",
]


def test_gpt2_from_package():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode_batch(["Hello world", " Hello"]) == [[15496, 995], [18435]]
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert len(tok.identity) == 64 and load_tokenizer("GPT2").identity == tok.identity


def test_trained_bpe_round_trips(tiny):
    tok = tiny["tok"]
    assert 257 <= tok.vocab_size <= 384 and tok.eos_id == 0
    docs = text_documents(tiny["files"], "paragraph")
    for text in docs + TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(docs[:5]) == [tok.encode(d) for d in docs[:5]]
    assert tok.encode("x<|endoftext|>")[-1] == tok.eos_id  # the separator is one special token
    assert tok.identity != load_tokenizer("gpt2").identity


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_hf_files_load_in_transformers(tiny, tmp_path, which):
    from transformers import GPT2TokenizerFast

    tok = tiny["tok"] if which == "trained" else load_tokenizer("gpt2")
    tok.save_hf_files(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    hf = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    texts = text_documents(tiny["files"], "paragraph")[:20] + TRICKY[:3]
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id
    # the folder is also a valid tokenizer spec for gptdist
    assert load_tokenizer(str(tmp_path)).identity == tok.identity


def test_folder_with_vocab_and_merges(tmp_path):
    gpt2 = load_tokenizer("gpt2")
    gpt2.save_hf_files(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_id == 50256 and tok.vocab_size == 50257


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(UserError, match=r"data\.tokenizer=.*no such file or folder"):
        load_tokenizer(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"model": {"type": "nope"}}))
    with pytest.raises(UserError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(str(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"vocab\.json"):
        load_tokenizer(str(tmp_path / "empty"))


def test_train_tokenizer_refuses_tiny_vocab(tiny, tmp_path):
    with pytest.raises(UserError, match="--vocab-size=100"):
        train_tokenizer([str(tiny["corpus"])], 100, tmp_path)


def test_char_tokenizer_numbers_characters_in_sorted_order(tmp_path, capsys):
    from gptdist.cli import main
    from gptdist.data import load_tokenizer

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    assert main(["tokenizer", "train", "--char", str(tmp_path / "input.txt"), "--out", str(tmp_path / "tok")]) == 0
    tok = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    chars = sorted(set(text))
    assert tok.vocab_size == len(chars) + 1 and tok.eos_id == len(chars)
    assert tok.encode(text) == [chars.index(c) for c in text]
    assert tok.decode(tok.encode(text)) == text
    assert main(["tokenizer", "train", str(tmp_path / "input.txt"), "--out", str(tmp_path / "x")]) == 2  # neither
