"""The chunked LM-head loss equals cross_entropy(linear(hidden, weight)) in value and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptdist.model import GPT, GPTConfig
from gptdist.model.head import LMHead, chunked_cross_entropy, default_chunk_rows


def reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(), ignore_index=-100)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude: robust to entries that are ~0."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def inputs(shape, d, vocab, seed=0, ignore_every=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=g)
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, scale=1.0):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize(
    "shape,d,vocab,chunk",
    [
        ((2, 16), 32, 101, 8),  # chunk divides the 32 rows
        ((2, 16), 32, 101, 7),  # ... and does not: a short last chunk
        ((3, 50), 48, 1000, 64),  # 150 rows in chunks of 64
        # GPT-2's padded vocabulary. (With under ~4 rows per matmul MKL takes a less accurate path over the 50k-long
        # sums, ~2e-5 from float64; from 4 rows on both heads are as close to float64 as each other.)
        ((4, 64), 16, 50304, 48),
        ((4, 33), 24, 257, 1000),  # one chunk larger than all rows
        ((5,), 8, 11, 2),  # a flat (N,) batch of rows
    ],
)
@pytest.mark.parametrize("ignore_every", [0, 3])
def test_equals_cross_entropy_of_linear_fp32(shape, d, vocab, chunk, ignore_every):
    h, w, t = inputs(shape, d, vocab, seed=len(shape) + d, ignore_every=ignore_every)
    ref = loss_and_grads(reference, h, w, t)
    ours = loss_and_grads(lambda a, b, c: chunked_cross_entropy(a, b, c, chunk), h, w, t)
    assert ours[0].dtype == torch.float32
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), ours, ref):
        assert rel(a, b) < 2e-6, f"{name}: {rel(a, b):.2e}"


def test_gradients_follow_the_incoming_scale():
    # DeepSpeed divides the loss by gradient-accumulation steps (and fp16 scales it) before backward.
    h, w, t = inputs((2, 20), 16, 64, ignore_every=5)
    ref = loss_and_grads(reference, h, w, t, scale=0.25)
    ours = loss_and_grads(lambda a, b, c: chunked_cross_entropy(a, b, c, 6), h, w, t, scale=0.25)
    for a, b in zip(ours[1:], ref[1:]):
        assert rel(a, b) < 2e-6


def test_bf16_inputs_give_bf16_gradients_close_to_the_reference():
    h32, w32, t = inputs((2, 64), 32, 512, seed=3, ignore_every=7)
    h, w = (x.detach().bfloat16().requires_grad_() for x in (h32, w32))
    ref = loss_and_grads(reference, h, w, t)
    ours = loss_and_grads(lambda a, b, c: chunked_cross_entropy(a, b, c, 48), h, w, t)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    # Both multiply in bf16 and reduce in float32: they differ by bf16 rounding (2**-8), not by method.
    assert rel(ours[0], ref[0]) < 1e-3
    assert rel(ours[1], ref[1]) < 2e-2 and rel(ours[2], ref[2]) < 2e-2


def test_no_grad_gives_the_loss_and_every_target_ignored_gives_nan():
    h, w, t = inputs((2, 10), 8, 30)
    with torch.no_grad():
        assert rel(chunked_cross_entropy(h, w, t, 3), reference(h, w, t)) < 2e-6
    ignored = torch.full_like(t, -100)
    assert math.isnan(chunked_cross_entropy(h, w, ignored, 3).item())
    assert math.isnan(reference(h, w, ignored).item())


def test_second_backward_is_refused_clearly():
    h, w, t = inputs((2, 10), 8, 30)
    loss = chunked_cross_entropy(h, w, t, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_head_without_targets_returns_logits():
    h, w, _ = inputs((2, 5), 8, 30)
    assert torch.equal(LMHead()(h, w), F.linear(h, w))


def test_default_chunk_rows_keeps_a_bounded_chunk():
    assert default_chunk_rows(50304) == 512
    assert default_chunk_rows(8192) == 4096
    assert default_chunk_rows(256000) == 256  # never fewer rows than that, even for huge vocabularies


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_gradients_match_the_unchunked_head(tie):
    # Tied: the head's weight gradient and the embedding's lookup gradient add up in one parameter.
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, vocab_size=97, seq_len=16, tie_embeddings=tie)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 97, (3, 16), generator=g)
    targets = torch.randint(0, 97, (3, 16), generator=g)
    targets[:, :4] = -100

    chunked = GPT(cfg, seed=11)
    chunked.head = LMHead(chunk_rows=10)
    plain = GPT(cfg, seed=11)
    plain.head.forward = lambda hidden, weight, tgt=None: reference(hidden, weight, tgt)
    losses = []
    for model in (chunked, plain):
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 2e-6 * abs(losses[1])
    for (name, a), (_, b) in zip(chunked.named_parameters(), plain.named_parameters()):
        assert rel(a.grad, b.grad) < 1e-5, name


def test_under_bf16_autocast_matches_the_autocast_reference():
    # The GPU fast path runs the head under autocast: the matmuls in bf16, the softmax and the sums in float32.
    h, w, t = inputs((2, 64), 32, 512, seed=4, ignore_every=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(reference, h, w, t)
        ours = loss_and_grads(lambda a, b, c: chunked_cross_entropy(a, b, c, 40), h, w, t)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    assert rel(ours[0], ref[0]) < 1e-3
    assert rel(ours[1], ref[1]) < 2e-2 and rel(ours[2], ref[2]) < 2e-2
