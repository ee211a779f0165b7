"""Sharded checkpoints: DeepSpeed's per-rank model and optimizer shards plus gptdist's client state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(engine, run_dir: Path, step: int, client_state: Dict[str, Any]) -> Path:
    """Every rank writes its shards; DeepSpeed moves the `latest` pointer after all have written."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={**client_state, "rng": rng_state()})
    return root / tag
