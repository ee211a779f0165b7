"""The language-model head: the final hidden states against every vocabulary row, and the loss on them.

With targets the head never builds the (B*T, vocab) logits. At GPT-2 sizes they are the largest activation of the
whole model (2048 tokens x 50304 words = 412 MB in float32), and the plain `cross_entropy(linear(h, W))` reads and
writes them about ten times (logits, log-softmax, its gradient, page faults on fresh allocations). Here the rows are
processed in chunks of a few hundred to a few thousand rows (a fixed memory budget whatever the batch), and each
chunk's gradient is computed right away in the forward pass (as Liger-Kernel's fused linear cross-entropy does):

    per chunk c:  logits_c = h_c W^T  ->  log_softmax (float32)  ->  loss rows = -logp[target]
                  G_c = softmax - onehot(target)          (d loss_row / d logits_c)
                  grad_h_c = w_c * (G_c W)                w_c = 1/count for counted rows, 0 for ignored ones
                  grad_W  += G_c^T (w_c * h_c)            accumulated in float32 across chunks

The backward pass then only scales the two stored gradients by the incoming scalar. Compared with recomputing the
chunk's logits in backward, this does the same matmul FLOPs as the unfused head (no recompute) and needs only the
(N, d) and (V, d) gradients between the passes. The weight may be the token embedding (tied head): autograd adds
the gradient returned for it to the embedding's own, into the one parameter.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100

# Chunk size: measured on 2 CPU cores (docs/performance.md), the training step got faster with every chunk size
# from 256 to 2048 rows at vocab 8192 and 50304; fewer than ~256 rows re-read the whole weight too often for the
# matmuls to stay efficient, and larger chunks cost memory. So: the most rows whose float32 logits fit in 128 MB,
# within [256, 4096] rows (vocab 50304 -> 512 rows = 103 MB; vocab 8192 -> 4096 rows).
_CHUNK_ELEMENTS = 2**25
_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS = 256, 4096


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary: the largest power of two with rows * vocab <= _CHUNK_ELEMENTS, clamped
    to [_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS]."""
    rows = _MIN_CHUNK_ROWS
    while rows < _MAX_CHUNK_ROWS and rows * 2 * vocab_size <= _CHUNK_ELEMENTS:
        rows *= 2
    return rows


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over counted rows of cross_entropy(hidden @ weight^T, targets), float32, computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                want_grads: bool) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.size(-1))
        t = targets.reshape(-1)
        n = h.size(0)
        counted = t != IGNORE_INDEX
        count = counted.sum()  # a tensor: no host sync
        safe_t = t.masked_fill(~counted, 0).unsqueeze(1)  # ignored rows read column 0, then get weight 0
        row_w = (counted.to(torch.float32) / count).unsqueeze(1)  # d mean / d row loss
        losses = torch.empty(n, dtype=torch.float32, device=h.device)

        # In pure float32 (no autocast) grad_W accumulates in place with addmm_; otherwise each chunk's product is
        # computed in the matmul dtype (bf16 under autocast or bf16 training) and added into a float32 sum.
        in_place = h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type)
        grad_h = torch.empty_like(h) if want_grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(n, start + chunk_rows))
            h_c = h[rows]
            logits = F.linear(h_c, weight).float()  # float32 log-softmax: bf16 loses too much over 50k words
            logp = torch.log_softmax(logits, dim=-1, out=logits)  # in place: nothing else reads this chunk's logits
            losses[rows] = logp.gather(1, safe_t[rows]).squeeze(1).neg_()
            if not want_grads:
                continue
            g = logp.exp_()  # softmax, in place
            g.scatter_add_(1, safe_t[rows], torch.full(safe_t[rows].shape, -1.0, device=g.device))  # - onehot
            g = g.to(weight.dtype)  # the matmul dtype, as the unfused head's backward casts its float32 gradient
            w_c = row_w[rows].to(h.dtype)
            # Scaling the small (c, d) factors by the row weights equals scaling the (c, V) gradient, for less work.
            grad_h[rows] = torch.mm(g, weight).mul_(w_c)
            h_scaled = h_c * w_c
            if in_place:
                grad_w.addmm_(g.t(), h_scaled)
            else:
                grad_w += torch.mm(g.t(), h_scaled).float()
        loss = (losses * counted).sum() / count  # NaN when every target is ignored, as F.cross_entropy
        ctx.grads = (grad_h, grad_w)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.grads
        if grad_h is None:
            raise RuntimeError("LMHead loss: backward through a loss computed without gradients (no_grad) or twice "
                               "(retain_graph is not supported: the stored gradients are handed to autograd)")
        ctx.grads = (None, None)  # release them: autograd may keep the very tensors as the parameters' .grad
        shape, h_dtype, w_dtype = ctx.shapes
        grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype)).view(shape).to(h_dtype)
        grad_w = grad_w.mul_(grad_loss).to(w_dtype)
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(), ignore_index=-100),
    in value and gradients, without the full logits. `chunk_rows` defaults to default_chunk_rows(vocab)."""
    rows = chunk_rows or default_chunk_rows(weight.size(0))
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, rows, want_grads)


class LMHead(nn.Module):
    """(hidden (B, T, d_model), weight (vocab, d_model)) -> logits (B, T, vocab), or with targets the mean
    cross-entropy over positions whose target is not -100 (float32, chunked: see the module docstring).

    It owns no parameters: the weight is the token embedding when tied (Press & Wolf, 2017) or `lm_head.weight`.
    Being a module of its own is what lets parallelism be applied from outside: a tensor-parallel plan swaps it
    for a vocab-parallel head that never gathers the full logits.
    """

    def __init__(self, chunk_rows: int | None = None):
        super().__init__()
        self.chunk_rows = chunk_rows

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, weight)
        return chunked_cross_entropy(hidden, weight, targets, self.chunk_rows)
