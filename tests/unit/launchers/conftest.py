"""Fixtures of the accelerate settings tests: a recipe, the environment accelerate launch would give a rank."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.accelerate_helpers import RANK_VARIABLES, open_recipe, rank_environment


@pytest.fixture
def recipe(tmp_path) -> Path:
    """2 ranks: micro-batch 4, global batch 8 (so gptdist derives 1 accumulation step at dp=2); no zero_stage set.
    The data paths are never opened here."""
    return open_recipe(tmp_path / "recipe.yaml", tmp_path / "corpus", tmp_path / "tokenizer.json", tmp_path / "run")


@pytest.fixture
def env_of(tmp_path):
    def compute(*flags: str):
        return rank_environment(flags, tmp_path / "no-default-config.yaml")
    return compute


@pytest.fixture
def as_rank(monkeypatch):
    """Make this process look like a rank with the given environment (launcher variables cleared first)."""
    def apply(env):
        for key in list(os.environ):
            if key.startswith(("ACCELERATE_", "SLURM_", "TORCHELASTIC_")) or key in RANK_VARIABLES:
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return apply
