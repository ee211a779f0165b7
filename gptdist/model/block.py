"""One Transformer block (pre-LayerNorm, as in GPT-2) and the feed-forward network inside it."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptdist.model.attention import CausalSelfAttention
from gptdist.model.config import GPTConfig
from gptdist.model.kv_cache import KVCache, LayerKVCache


def make_activation(name: str) -> nn.Module:
    # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in transformers); keep it the
    # default so imported GPT-2 weights reproduce their logits.
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Module):
    """Position-wise feed-forward network: (B, T, d_model) -> (B, T, ffn_dim) -> activation -> (B, T, d_model)."""

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias, device=device)
        self.act = make_activation(cfg.activation)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias, device=device)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x)). Normalizing the branch inputs, not the sum, keeps the
    residual stream an identity path, which is what lets deep stacks train without warm-up tricks."""

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias, device=device)
        self.attn = CausalSelfAttention(cfg, device=device)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias, device=device)
        self.mlp = MLP(cfg, device=device)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv_cache=kv_cache, start_pos=start_pos)
        return x + self.mlp(self.ln2(x))


class Blocks(nn.ModuleList):
    """A ModuleList of Blocks that can also be called: runs them in order.

    Slicing a ModuleList returns the same class, so a pipeline stage can hold `model.blocks[i:j]` and
    call it directly. Parameter names stay `blocks.<i>.…`, as with a plain ModuleList. A KVCache is
    indexed by position in this list.
    """

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        for i, block in enumerate(self):
            x = block(x, kv_cache=kv_cache[i] if kv_cache is not None else None, start_pos=start_pos)
        return x
