"""Generation: the KV cache equals full forwards, greedy decoding equals transformers', limits, EOS and sampling."""

from __future__ import annotations

import pytest
import torch

from gptdist.model import GPT, generate
from gptdist.model.hf import config_from_hf, load_hf_gpt2_state_dict
from tests.model_helpers import HF_SHAPES, perturb_, random_hf, tiny_config

transformers = pytest.importorskip("transformers")




def greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_kv_cache_matches_full_forward_for_chunks():
    model = GPT(tiny_config(), seed=0).eval()
    idx = torch.randint(0, 61, (2, 20))
    full = model(idx)
    cache = model.new_kv_cache()
    parts, pos = [], 0
    for chunk in (7, 1, 5, 1, 6):  # multi-token chunks after a non-empty cache need the offset mask
        parts.append(model(idx[:, pos : pos + chunk], kv_cache=cache, start_pos=pos))
        pos += chunk
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_greedy_matches_no_cache_and_hf_generate(shape):
    hf = random_hf(shape, seed=5)
    perturb_(hf, 6)
    model = GPT(config_from_hf(hf.config), seed=None).eval()
    load_hf_gpt2_state_dict(model, hf.state_dict())
    prompt = torch.randint(0, shape["vocab_size"], (9,), generator=torch.Generator().manual_seed(3)).tolist()
    n = 12

    ours = generate(model, prompt, n)
    assert ours == greedy_without_cache(model, prompt, n)
    out = hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n, do_sample=False, pad_token_id=0,
    )
    assert ours == out[0, len(prompt) :].tolist()


def test_generation_limits_and_eos():
    cfg = tiny_config()
    model = GPT(cfg, seed=0)
    prompt = [1, 2, 3]
    full = generate(model, prompt, 100)
    assert len(full) == cfg.seq_len - len(prompt)  # stops when the context window is full
    assert generate(model, prompt, 4) == full[:4]
    eos = full[2]
    stopped = generate(model, prompt, 100, eos_id=eos)
    assert stopped == full[: full.index(eos) + 1]
    with pytest.raises(ValueError):
        generate(model, list(range(cfg.seq_len + 1)), 1)


def test_sampling_reproducible_and_top_k_1_is_greedy():
    model = GPT(tiny_config(), seed=0)
    model.train()
    prompt = [5, 6, 7]

    def sample(seed, **kw):
        return generate(model, prompt, 15, greedy=False, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(0, temperature=1.5) == sample(0, temperature=1.5)
    assert sample(0, temperature=1.5) != sample(1, temperature=1.5)
    assert sample(0, top_k=5, top_p=0.9) == sample(0, top_k=5, top_p=0.9)
    assert sample(4, top_k=1) == generate(model, prompt, 15)
    assert sample(4, top_p=1e-6) == generate(model, prompt, 15)
    assert model.training  # mode restored
