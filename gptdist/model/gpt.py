"""The decoder-only GPT: embeddings, a stack of pre-LayerNorm blocks, a final LayerNorm and the LM head."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptdist.model.block import Block, Blocks
from gptdist.model.config import GPTConfig
from gptdist.model.embedding import Embeddings
from gptdist.model.head import LMHead
from gptdist.model.init import init_parameters
from gptdist.model.kv_cache import KVCache


class GPT(nn.Module):
    """idx (B, T) token ids -> logits (B, T, vocab_size), or the mean cross-entropy given targets.

    The pieces are public so a pipeline stage can run part of the model:
        logits(final_hidden(blocks(embed(idx)))) == forward(idx)
    and `blocks[i:j]` is itself callable (see Blocks).

    Initialization: the constructor calls `init_parameters(self, seed)`, so `GPT(cfg, seed=s)` has
    the same values whatever the global RNG state. Pass `seed=None` to skip it when the values will
    be overwritten anyway (loading a checkpoint, or building on the meta device to materialize and
    `init_parameters` later, shard by shard). `device="meta"` builds the structure without storage.
    """

    def __init__(self, cfg: GPTConfig, *, seed: int | None = 0, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg, device=device)
        self.blocks = Blocks(Block(cfg, device=device) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias, device=device)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device=device)
        self.head = LMHead()
        if seed is not None:
            init_parameters(self, seed)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last LayerNorm: the blocks leave the residual stream unnormalized."""
        return self.ln_f(hidden)

    def head_weight(self) -> torch.Tensor:
        """The (vocab, d_model) matrix the head scores against. Tied: the token embedding itself (Press & Wolf,
        2017), which saves vocab*d_model parameters and ties input and output meaning."""
        return self.embed.wte.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, vocab_size)."""
        return self.head(hidden, self.head_weight())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Logits in the model's dtype without targets; with targets (B, T), the mean cross-entropy
        over positions whose target is not -100, computed in float32 (bf16 log-softmax over a
        50k vocabulary loses too much precision).

        With `kv_cache`, `idx` holds only the new tokens, at positions start_pos.. (see decoding.py).
        """
        hidden = self.blocks(self.embed(idx, start_pos), kv_cache=kv_cache, start_pos=start_pos)
        return self.head(self.final_hidden(hidden), self.head_weight(), targets)

    def new_kv_cache(self) -> KVCache:
        """An empty cache with one slot per block, long enough for the whole context."""
        return KVCache(len(self.blocks), self.cfg.seq_len)
