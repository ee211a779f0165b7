"""Autoregressive decoding with a KV cache: the prompt is run once, then one new token per step."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptdist.model.kv_cache import KVCache


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf the logits outside the top_k, then outside the smallest set with mass >= top_p."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the best token always stays
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt_ids` with a GPT and return the new ids only.

    Greedy takes the argmax each step (temperature, top_k and top_p are then ignored); otherwise the
    next id is sampled from softmax(logits / temperature) restricted by top_k and top_p, using
    `generator` (on any device; sampling happens there) for reproducibility. Decoding stops after
    `eos_id` (which is returned), after `max_new_tokens`, or when prompt plus output fill `seq_len`,
    the longest context the position table covers. The model runs in eval mode (no dropout) and is
    put back in its previous mode afterwards.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    if not greedy and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling (use greedy=True for argmax)")
    seq_len = model.cfg.seq_len
    if len(prompt_ids) > seq_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds seq_len={seq_len}")
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(len(model.blocks), seq_len)
        new: list[int] = []
        inp = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        pos = 0  # position of inp's first token
        while len(new) < max_new_tokens and len(prompt_ids) + len(new) < seq_len:
            logits = model(inp, kv_cache=cache, start_pos=pos)[0, -1].float()  # (vocab,)
            pos += inp.size(1)
            if greedy:
                nxt = int(logits.argmax())
            else:
                logits = _filter_logits(logits / temperature, top_k, top_p)
                probs = logits.softmax(-1)
                if generator is not None:
                    probs = probs.to(generator.device)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            new.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
            inp = torch.tensor([[nxt]], dtype=torch.long, device=device)
        return new
    finally:
        model.train(was_training)
