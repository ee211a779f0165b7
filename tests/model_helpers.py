"""Shared by the model tests: small GPT configs, and random transformers GPT-2 models to compare with."""

from __future__ import annotations

import pytest
import torch

from gptdist.model import GPTConfig

transformers = pytest.importorskip("transformers")

HF_SHAPES = [
    dict(n_layer=2, n_head=4, n_embd=64, vocab_size=101, n_positions=32),
    dict(n_layer=3, n_head=2, n_embd=48, vocab_size=257, n_positions=64),
]


def tiny_config(**kw) -> GPTConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, vocab_size=61, seq_len=24)
    return GPTConfig(**{**base, **kw})


def random_hf(shape: dict, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def perturb_(model: torch.nn.Module, seed: int) -> None:
    # Fresh HF models have zero biases and unit LayerNorms; random values make the parity check see them.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
