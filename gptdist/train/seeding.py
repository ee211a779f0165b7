"""Seeds for the random streams of every rank: Python's, NumPy's, torch's (CPU and every CUDA device).

What draws from them during training is dropout, so the rule is Megatron's: ranks that hold *different* activations
draw different masks, ranks that hold the *same* activations draw the same ones. Data-parallel replicas see
different samples and pipeline stages different layers: their streams differ. The tensor-parallel ranks of a replica
hold the embedding output and the residual stream replicated (a row-parallel layer's all-reduce gives every TP rank
the same sum), so they must drop the same positions, or the replicas of one activation would disagree: they share
a stream. (Attention-probability dropout inside a TP-sharded head then also uses that shared stream; each rank
applies it to different heads, so the masks are not correlated across heads in any way that matters to training.)

The weights never come from these streams: parameters are initialized from generators seeded by (seed, parameter
name), the same in every layout. Nor does the data order: the loader has its own seeded permutation.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def rank_seed(seed: int, dp_rank: int, pp_rank: int, start_step: int = 0) -> int:
    """A 63-bit seed from train.seed and the rank's place (not its TP rank); a run resumed in another layout (whose
    RNG states cannot be carried over) starts new streams at its first step instead of replaying step 1's."""
    blob = f"gptdist-rng|{seed}|dp{dp_rank}|pp{pp_rank}|step{start_step}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def seed_rank(seed: int, dp_rank: int, pp_rank: int, start_step: int = 0) -> int:
    value = rank_seed(seed, dp_rank, pp_rank, start_step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # every CUDA device too
    return value
