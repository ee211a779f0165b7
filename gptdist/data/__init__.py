"""Streaming, tokenized, packed and rank-sharded training data.

    tok = check_data(cfg.data, cfg.model.vocab_size)          # before training: one-line UserErrors
    with build_train_loader(cfg.data, seq_len=..., micro_batch_size=..., dp_rank=r, dp_size=d,
                            seed=cfg.train.seed, state=saved) as loader:
        for batch in loader:                                  # endless; batch.state goes into checkpoints
            ...

Imports are lazy: `gptdist.config` imports `gptdist.data.config`, and reading a config must not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from gptdist.data.config import DataConfig, SourceSpec

_EXPORTS = {
    "GPTTokenizer": "gptdist.data.tokenizer",
    "load_tokenizer": "gptdist.data.tokenizer",
    "train_tokenizer": "gptdist.data.tokenizer_train",
    "check_data": "gptdist.data.checks",
    "build_train_loader": "gptdist.data.loader",
    "iter_samples": "gptdist.data.loader",
    "TrainLoader": "gptdist.data.loader",
    "Batch": "gptdist.data.packing",
}

__all__ = ["DataConfig", "SourceSpec", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gptdist.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(__all__)
