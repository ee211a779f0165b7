"""The LM head and its cross-entropy with the vocabulary split across tensor-parallel ranks.

Each rank multiplies the hidden states by its V/tp rows of the output embedding and keeps those
logits local. The loss needs only three numbers per token from the other ranks, the max logit, the
target's logit and the sum of exponentials, so the (tokens x vocab) logits are never gathered: at
GPT-2 sizes they are the largest activation of the whole model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gptdist.parallel.tp.comm import Group, copy_to_tp_region, gather_from_tp_region, tp_rank, tp_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Group, ignore_index: int) -> torch.Tensor:
        size = tp_size(group)
        v_local = logits.size(-1)
        start = tp_rank(group) * v_local

        # Subtract the global max before exponentiating, as log_softmax does: exp of a large logit
        # overflows float32. It cancels out of the loss, so its gradient is not needed.
        global_max = logits.max(dim=-1).values
        if size > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - global_max.unsqueeze(-1)

        ignored = targets == ignore_index
        # The target's logit lives on exactly one rank; the others contribute 0 to the sum below.
        foreign = (targets < start) | (targets >= start + v_local) | ignored
        local_targets = (targets - start).masked_fill(foreign, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(foreign, 0.0)

        exp = shifted.exp_()  # `shifted` is our own buffer: reuse it
        sum_exp = exp.sum(dim=-1)
        if size > 1:
            both = torch.stack([target_logit, sum_exp])  # one collective for the two sums
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]

        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, foreign, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_targets, foreign, ignored = ctx.saved_tensors
        # d loss_t / d logit_v = softmax_v - [v == target]; only the owning rank has the target column.
        g = grad_loss.masked_fill(ignored, 0.0)
        grad = softmax * g.unsqueeze(-1)  # a new tensor: `softmax` stays intact for a retained graph
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -g.masked_fill(foreign, 0.0).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, group: Group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy (float32, shape of `targets`, 0 where target == ignore_index) from
    this rank's slice of the logits, columns [rank*V/tp, (rank+1)*V/tp) of the vocabulary.

    Equal to F.cross_entropy(full_logits, targets, reduction="none", ignore_index=...) on the
    gathered logits. Every rank returns the same losses. Targets outside [0, V) other than
    ignore_index are not detected (checking would cost a device sync); they get loss logsumexp.
    """
    return _VocabParallelCrossEntropy.apply(local_logits.float(), targets, group, ignore_index)


class VocabParallelLMHead(nn.Module):
    """Drop-in for the GPT's `head`: forward(hidden, weight, targets=None), where `weight` is this
    rank's (V/tp, d_model) slice of the output embedding (the vocab-parallel `embed.wte.weight` when
    tied, the vocab-sharded `lm_head.weight` when not).

    Without targets: the full logits (B, T, V), gathered along the vocabulary (generation, eval).
    With targets: the mean cross-entropy over targets != ignore_index, float32, identical on every
    rank, as the unsharded head computes it. The hidden states pass through f because every rank's
    vocabulary slice contributes to their gradient.
    """

    def __init__(self, group: Group = None, ignore_index: int = -100):
        super().__init__()
        self.group = group
        self.tp_rank = tp_rank(group)
        self.tp_size = tp_size(group)
        self.ignore_index = ignore_index

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        local_logits = self.local_logits(hidden, weight)
        if targets is None:
            return gather_from_tp_region(local_logits, self.group)
        return self.loss(local_logits, targets)

    def local_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> this rank's (B, T, V/tp) logits. With `loss`, the two halves of forward, for a
        pipeline whose last stage outputs logits and whose loss function runs separately."""
        return F.linear(copy_to_tp_region(hidden, self.group), weight)

    def loss(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != ignore_index (NaN when there are none, as F.cross_entropy)."""
        losses = vocab_parallel_cross_entropy(local_logits, targets, self.group, self.ignore_index)
        return losses.sum() / (targets != self.ignore_index).sum()

    def extra_repr(self) -> str:
        return f"tp={self.tp_rank}/{self.tp_size}"
