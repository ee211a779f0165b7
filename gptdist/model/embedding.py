"""Token and position embeddings: the first stage of the GPT, turning token ids into the residual stream."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptdist.model.config import GPTConfig


def sinusoidal_positions(seq_len: int, d_model: int) -> torch.Tensor:
    """The fixed (seq_len, d_model) table of Vaswani et al. (2017), section 3.5.

    Even columns hold sin(pos / 10000^(2i/d)), odd columns cos of the same angle, so each pair of
    columns is a rotation at one frequency and relative offsets are linear maps of the encoding.
    """
    pos = torch.arange(seq_len, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = pos * inv_freq  # (seq_len, ceil(d_model/2))
    table = torch.zeros(seq_len, d_model)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])  # an odd d_model has one fewer cos column
    return table


class Embeddings(nn.Module):
    """idx (B, T) -> hidden (B, T, d_model): token embedding (+ scale) + position embedding, then dropout.

    `wte` is also the LM head's weight when embeddings are tied (see GPT.logits). Learned positions live
    in `wpe`; sinusoidal ones are a non-persistent buffer, recomputed rather than checkpointed.
    """

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.seq_len = cfg.seq_len
        self.d_model = cfg.d_model
        self.pos_embedding = cfg.pos_embedding
        # Vaswani et al. scale by sqrt(d_model) so token vectors are not drowned by the unit-size sinusoids.
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, device=device)
        if cfg.pos_embedding == "learned":
            self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model, device=device)
        else:
            table = sinusoidal_positions(cfg.seq_len, cfg.d_model)
            self.register_buffer("pos_table", table.to(device) if device is not None else table, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)

    def reset_buffers(self) -> None:
        """Refill the sinusoidal table, e.g. after a meta-device build was materialized with `to_empty`."""
        if self.pos_embedding == "sinusoidal":
            with torch.no_grad():
                self.pos_table.copy_(sinusoidal_positions(self.seq_len, self.d_model))

    def forward(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        T = idx.size(1)
        if start_pos + T > self.seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed seq_len={self.seq_len}")
        tok = self.wte(idx)  # (B, T, d_model)
        if self.scale != 1.0:
            tok = tok * self.scale
        if self.pos_embedding == "learned":
            pos = self.wpe(torch.arange(start_pos, start_pos + T, device=idx.device))  # (T, d_model)
        else:
            pos = self.pos_table[start_pos : start_pos + T].to(tok.dtype)
        return self.drop(tok + pos)  # positions broadcast over the batch
