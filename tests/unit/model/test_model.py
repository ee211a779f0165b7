"""The plain-PyTorch GPT: parity with transformers' GPT-2, parameter/FLOP formulas, init, options, decoding."""

from __future__ import annotations

import math

import pytest
import torch

from gptdist.model import GPT, GPTConfig, count_parameters, flops_per_token, init_parameters
from gptdist.model.hf import config_from_hf, hf_config_from, load_hf_gpt2_state_dict, to_hf_gpt2_state_dict
from gptdist.model.init import init_value
from tests.model_helpers import HF_SHAPES, perturb_, random_hf, tiny_config

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------- transformers parity


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_logits_match_hf_gpt2_both_ways(shape):
    hf = random_hf(shape)
    perturb_(hf, 1)
    model = GPT(config_from_hf(hf.config), seed=None).eval()
    load_hf_gpt2_state_dict(model, hf.state_dict())

    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = model(idx)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5

    # export into a fresh HF model built from our config
    hf2 = transformers.GPT2LMHeadModel(hf_config_from(model.cfg)).eval()
    hf2.load_state_dict(to_hf_gpt2_state_dict(model), strict=True)
    with torch.no_grad():
        assert (hf2(idx).logits - ref).abs().max().item() < 1e-5


def test_hf_loader_accepts_bare_gpt2model_keys_and_rejects_mismatch():
    hf = random_hf(HF_SHAPES[0])
    model = GPT(config_from_hf(hf.config), seed=None).eval()
    load_hf_gpt2_state_dict(model, hf.transformer.state_dict())  # no "transformer." prefix, no lm_head
    assert torch.equal(model.embed.wte.weight, hf.transformer.wte.weight)
    wrong = GPT(tiny_config(d_model=64, n_head=4, vocab_size=101, seq_len=16), seed=0)
    with pytest.raises(ValueError):
        load_hf_gpt2_state_dict(wrong, hf.state_dict())


def test_hf_config_round_trip():
    cfg = tiny_config(activation="relu", d_ff=40, tie_embeddings=False, dropout=0.1, layer_norm_eps=1e-6)
    hf_cfg = hf_config_from(cfg)
    assert (hf_cfg.n_positions, hf_cfg.activation_function, hf_cfg.attn_pdrop) == (24, "relu", 0.1)
    assert config_from_hf(hf_cfg) == cfg
    assert hf_config_from(tiny_config()).activation_function == "gelu_new"
    with pytest.raises(ValueError):
        hf_config_from(tiny_config(pos_embedding="sinusoidal"))


# ---------------------------------------------------------------- parameters and FLOPs


def test_gpt2_small_parameter_count():
    cfg = GPTConfig(n_layer=12, n_head=12, d_model=768, vocab_size=50257, seq_len=1024)
    assert count_parameters(cfg) == 124_439_808
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert count_parameters(cfg, include_positions=False) == 124_439_808 - 1024 * 768


def test_flops_per_token_formula():
    cfg = tiny_config()
    L, d, T, V = 2, 32, 24, 61
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    n = V * d + L * per_block + 2 * d  # no positions; tied head once
    assert flops_per_token(cfg) == 6 * n + 12 * L * d * T


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(tie_embeddings=False), dict(bias=False), dict(pos_embedding="sinusoidal"), dict(d_ff=50)],
)
def test_count_parameters_matches_built_model(kw):
    cfg = tiny_config(**kw)
    assert count_parameters(cfg) == sum(p.numel() for p in GPT(cfg).parameters())


# ---------------------------------------------------------------- initialization


def test_init_is_deterministic_and_ignores_global_rng():
    torch.manual_seed(0)
    a = GPT(tiny_config(), seed=7).state_dict()
    torch.manual_seed(123)
    b = GPT(tiny_config(), seed=7).state_dict()
    c = GPT(tiny_config(), seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_block0_same_in_2_and_4_layer_models():
    two = dict(GPT(tiny_config(n_layer=2), seed=3).named_parameters())
    four = dict(GPT(tiny_config(n_layer=4), seed=3).named_parameters())
    for name, p in two.items():
        if not name.startswith("blocks.0.") and name.startswith("blocks."):
            continue
        q = four[name]
        if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            # same noise; the scale init_std/sqrt(2*n_layer) depends on depth by design
            torch.testing.assert_close(p / math.sqrt(1 / 4), q / math.sqrt(1 / 8))
        else:
            assert torch.equal(p, q), name


def test_init_scheme():
    cfg = tiny_config(n_layer=8, d_model=256, n_head=4)
    model = GPT(cfg, seed=0)
    qkv, proj = model.blocks[0].attn.qkv.weight, model.blocks[0].attn.proj.weight
    assert abs(qkv.std().item() - 0.02) < 0.001
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert model.blocks[0].mlp.fc2.weight.std() < 0.5 * model.blocks[0].mlp.fc1.weight.std()
    assert torch.all(model.blocks[1].attn.qkv.bias == 0)
    assert torch.all(model.ln_f.weight == 1) and torch.all(model.ln_f.bias == 0)
    # init_value gives the full tensor without the module; wrapper prefixes do not change it
    full = init_value("blocks.0.attn.qkv.weight", (768, 256), cfg, 0)
    assert torch.equal(full, qkv)
    assert torch.equal(init_value("_orig_mod.module.blocks.0.attn.qkv.weight", (768, 256), cfg, 0), full)
    with pytest.raises(ValueError):
        init_value("blocks.0.attn.mystery", (3,), cfg, 0)


def test_meta_build_then_materialize():
    cfg = tiny_config(pos_embedding="sinusoidal")
    with torch.device("meta"):
        model = GPT(cfg, seed=0)
    model.to_empty(device="cpu")
    init_parameters(model, seed=0)
    ref = GPT(cfg, seed=0)
    idx = torch.randint(0, 61, (1, 8))
    torch.testing.assert_close(model(idx), ref(idx), rtol=0, atol=0)


# ---------------------------------------------------------------- options and pieces


@pytest.mark.parametrize(
    "kw",
    [
        dict(pos_embedding="sinusoidal"),
        dict(activation="relu"),
        dict(activation="gelu"),
        dict(tie_embeddings=False),
        dict(scale_embeddings=True),
        dict(bias=False),
        dict(dropout=0.1),
    ],
)
def test_options_forward_backward(kw):
    cfg = tiny_config(**kw)
    model = GPT(cfg, seed=0)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    loss = model(idx, targets)
    assert loss.ndim == 0 and abs(loss.item() - math.log(cfg.vocab_size)) < 1.0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if not cfg.tie_embeddings:
        assert not torch.equal(model.lm_head.weight, model.embed.wte.weight)
        assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    else:
        assert not hasattr(model, "lm_head")


def test_pieces_compose_to_forward_and_loss_ignores_minus_100():
    model = GPT(tiny_config(), seed=0).eval()
    idx = torch.randint(0, 61, (2, 12))
    logits = model(idx)
    torch.testing.assert_close(model.logits(model.final_hidden(model.blocks(model.embed(idx)))), logits)
    h = model.blocks[1:](model.blocks[:1](model.embed(idx)))  # two pipeline stages
    torch.testing.assert_close(model.logits(model.final_hidden(h)), logits)
    targets = idx.clone()
    targets[:, 6:] = -100
    ref = torch.nn.functional.cross_entropy(logits[:, :6].reshape(-1, 61), idx[:, :6].reshape(-1))
    torch.testing.assert_close(model(idx, targets), ref)


def head_shard(attn, heads: slice) -> torch.nn.Module:
    """The attention of one tensor-parallel rank: qkv keeps its heads' rows inside each of q, k, v;
    proj keeps the matching input columns and no bias (added once after the row-parallel sum)."""
    d, hd = attn.qkv.in_features, attn.head_dim
    cols = torch.arange(heads.start * hd, heads.stop * hd)
    rows = torch.cat([cols + s * d for s in range(3)])
    shard = type(attn)(GPTConfig(n_head=attn.n_head, d_model=d)).eval()
    shard.qkv = torch.nn.Linear(d, len(rows))
    shard.proj = torch.nn.Linear(len(cols), d, bias=False)
    with torch.no_grad():
        shard.qkv.weight.copy_(attn.qkv.weight[rows])
        shard.qkv.bias.copy_(attn.qkv.bias[rows])
        shard.proj.weight.copy_(attn.proj.weight[:, cols])
    return shard


def test_attention_heads_follow_weight_shapes():
    attn = GPT(tiny_config(), seed=0).eval().blocks[0].attn  # 4 heads
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        partial = head_shard(attn, slice(0, 2))(x) + head_shard(attn, slice(2, 4))(x)
        torch.testing.assert_close(partial + attn.proj.bias, attn(x))


# ---------------------------------------------------------------- generation










