"""Shared by the peer scripts: their arguments, the GPT-2 of the recipe's shape, random batches, the timing file.

Kept free of gptdist imports: a peer run is what its users write, and must not borrow gptdist's code paths.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import List


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    for name in ("n-layer", "n-head", "d-model", "vocab", "seq", "micro-batch", "steps", "zero", "warmup-steps"):
        p.add_argument(f"--{name}", type=int, required=True)
    for name in ("lr", "min-lr", "weight-decay", "beta1", "beta2", "eps", "clip"):
        p.add_argument(f"--{name}", type=float, required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True, help="JSON file for rank 0's step end times")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")))  # the launcher's
    return p.parse_args()


def gpt2(args):
    """transformers' GPT-2 with gptdist's recipe shape: no dropout, tied head, GELU (tanh), pre-LayerNorm."""
    # transformers: only the scripts that build a model load it
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.d_model, vocab_size=args.vocab,
                        n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-5)
    return GPT2LMHeadModel(config)


def random_tokens(args, rank: int, count: int):
    """`count` sequences of uniform random tokens, a different stream per rank."""
    # torch: only the scripts that make tokens load it
    import torch

    gen = torch.Generator().manual_seed(args.seed + rank)
    return torch.randint(0, args.vocab, (count, args.seq), generator=gen)


class StepClock:
    """perf_counter at the end of every optimizer step, written by rank 0 at the end."""

    def __init__(self) -> None:
        self.ends: List[float] = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def write(self, path: str, rank: int, tokens_per_step: int) -> None:
        if rank == 0:
            Path(path).write_text(json.dumps({"step_ends": self.ends, "tokens_per_step": tokens_per_step}))
