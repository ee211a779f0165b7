"""The language-model head: the final hidden states against every vocabulary row, and the loss on them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LMHead(nn.Module):
    """(hidden (B, T, d_model), weight (vocab, d_model)) -> logits (B, T, vocab), or with targets the mean
    cross-entropy over positions whose target is not -100.

    It owns no parameters: the weight is the token embedding when tied (Press & Wolf, 2017) or `lm_head.weight`.
    Being a module of its own is what lets parallelism be applied from outside: a tensor-parallel plan swaps it
    for a vocab-parallel head that never gathers the full logits.
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = F.linear(hidden, weight)
        if targets is None:
            return logits
        # float32 log-softmax: in bf16 a 50k-way softmax loses too much precision.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
