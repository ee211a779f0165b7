"""The tools' fixtures: a random small GPT-2 of transformers, saved, and imported as a gptdist checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptdist.cli import main
from tests.helpers import write_recipe

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------ fast: a random small GPT-2



@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=32,
                                  bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # fresh biases are 0 and LayerNorms 1; random values make every tensor count
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "gpt2-small-random"
    hf_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, corpus, tokenizer_path) -> Path:
    tmp = tmp_path_factory.mktemp("recipe")
    return write_recipe(tmp / "r.yaml", corpus, tokenizer_path, tmp / "run")


@pytest.fixture(scope="module")
def imported(hf_dir, recipe, tmp_path_factory) -> Path:
    """A run directory holding the random model as a step-0 checkpoint (import-hf run in this process)."""
    run = tmp_path_factory.mktemp("imported") / "run"
    assert main(["import-hf", str(hf_dir), "--out", str(run), "--config", str(recipe)]) == 0
    return run


@pytest.fixture()
def heldout(tmp_path, corpus) -> Path:
    """A slice of one play, small enough for a whole pass in well under a second."""
    text = sorted(corpus.glob("*.txt"))[-1].read_text(encoding="utf-8", errors="replace")
    path = tmp_path / "heldout.txt"
    path.write_text(text[20000:26000], encoding="utf-8")
    return path
