"""Masked multi-head self-attention, the only place where positions exchange information."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptdist.model.config import GPTConfig
from gptdist.model.kv_cache import LayerKVCache


class CausalSelfAttention(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model); each position attends to itself and earlier positions.

    `qkv` produces [q | k | v] (each n_head*head_dim wide, heads contiguous inside each) and `proj`
    mixes the concatenated head outputs back into the residual stream. The number of heads is read
    from the activations (width // head_dim), not from the config: a tensor-parallel plan that
    replaces `qkv` by a layer producing only this rank's heads, and `proj` by a row-parallel one,
    needs no change here. `n_head` records the unsharded count for reference.
    """

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias, device=device)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias, device=device)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, T, heads*head_dim)
        # (B, T, heads, hd) -> (B, heads, T, hd): attention runs per head over the T axis
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))

        mask, causal = None, True
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)  # keys/values for positions 0 .. start_pos+T-1
            if start_pos > 0:
                causal = False
                if T > 1:
                    # SDPA's is_causal aligns the triangle top-left, which is wrong once cached keys
                    # precede the queries: query i (position start_pos+i) may see keys 0..start_pos+i.
                    mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                # T == 1: the single new token may see every cached key, so no mask at all.

        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # concatenate heads: (B, T, heads*hd)
        return self.resid_drop(self.proj(y))
