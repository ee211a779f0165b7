"""Conversion to and from Hugging Face `transformers` GPT-2 (config and weights).

GPT-2's checkpoints use `Conv1D` layers whose weight is stored (in, out), the transpose of
`nn.Linear`; the fused `c_attn` has the same [q | k | v] layout as our `qkv`, so a transpose is all
it takes. `transformers` is imported inside the functions: it takes seconds to import and only
conversion needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from gptdist.model.config import GPTConfig

if TYPE_CHECKING:
    from transformers import GPT2Config

    from gptdist.model.gpt import GPT

_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}

# our name inside a block -> (HF name inside transformer.h.<i>, stored transposed?)
_BLOCK_MAP = {
    "ln1.weight": ("ln_1.weight", False),
    "ln1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln2.weight": ("ln_2.weight", False),
    "ln2.bias": ("ln_2.bias", False),
    "mlp.fc1.weight": ("mlp.c_fc.weight", True),
    "mlp.fc1.bias": ("mlp.c_fc.bias", False),
    "mlp.fc2.weight": ("mlp.c_proj.weight", True),
    "mlp.fc2.bias": ("mlp.c_proj.bias", False),
}
_TOP_MAP = {
    "embed.wte.weight": "transformer.wte.weight",
    "embed.wpe.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


def config_from_hf(hf: "GPT2Config") -> GPTConfig:
    """A GPTConfig with the same architecture as a `transformers.GPT2Config`.

    GPT-2 has three dropout rates (embedding, residual, attention); gptdist has one, taken from
    `resid_pdrop`. Variants gptdist does not implement raise ValueError instead of loading wrongly.
    """
    act = _ACT_FROM_HF.get(hf.activation_function)
    if act is None:
        raise ValueError(f"activation_function {hf.activation_function!r} is not supported")
    if not getattr(hf, "scale_attn_weights", True) or getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("only GPT-2's standard 1/sqrt(head_dim) attention scaling is supported")
    if getattr(hf, "add_cross_attention", False):
        raise ValueError("cross-attention is not supported (decoder-only GPT)")
    return GPTConfig(
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        d_model=hf.n_embd,
        d_ff=hf.n_inner,
        vocab_size=hf.vocab_size,
        seq_len=hf.n_positions,
        pos_embedding="learned",
        activation=act,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        scale_embeddings=False,
        bias=True,
        layer_norm_eps=hf.layer_norm_epsilon,
        dropout=hf.resid_pdrop,
        init_std=hf.initializer_range,
    )


def hf_config_from(cfg: GPTConfig) -> "GPT2Config":
    """The `transformers.GPT2Config` of the same architecture (for export). GPT-2 has no option for
    sinusoidal positions, scaled embeddings or bias-free layers, so those raise ValueError."""
    # transformers: slow to import, only when a Hugging Face config is made
    from transformers import GPT2Config

    _check_exportable(cfg)
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_ff,
        activation_function=_ACT_TO_HF[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        # GPT-2's 50256 would be outside a small vocabulary; the exporter sets real ids if it has them
        bos_token_id=None,
        eos_token_id=None,
    )


def _check_exportable(cfg: GPTConfig) -> None:
    unsupported = []
    if cfg.pos_embedding != "learned":
        unsupported.append("pos_embedding='sinusoidal'")
    if cfg.scale_embeddings:
        unsupported.append("scale_embeddings=True")
    if not cfg.bias:
        unsupported.append("bias=False")
    if unsupported:
        raise ValueError(f"GPT-2 cannot represent: {', '.join(unsupported)}")


def _name_pairs(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    """(our name, HF GPT2LMHeadModel name, transposed) for every parameter of GPT(cfg)."""
    pairs = []
    for ours, theirs in _TOP_MAP.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        pairs.append((ours, theirs, False))
    for i in range(cfg.n_layer):
        for ours, (theirs, transposed) in _BLOCK_MAP.items():
            pairs.append((f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", transposed))
    return pairs


@torch.no_grad()
def load_hf_gpt2_state_dict(model: "GPT", hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a GPT-2 state dict (of GPT2LMHeadModel, or of GPT2Model without the `transformer.`
    prefix) into `model`, whose config must match (see config_from_hf).

    Causal-mask buffers (`attn.bias`, `attn.masked_bias`) of older checkpoints are ignored; so is
    `lm_head.weight` when the model ties it to the token embedding. Any other missing, unexpected or
    wrongly shaped tensor raises, so a mismatched config cannot load silently.
    """
    _check_exportable(model.cfg)
    sd: dict[str, Any] = {}
    for k, v in hf_state_dict.items():
        if not k.startswith("transformer.") and k != "lm_head.weight":
            k = "transformer." + k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        sd[k] = v
    params = dict(model.named_parameters())
    used = set()
    for ours, theirs, transposed in _name_pairs(model.cfg):
        if theirs not in sd:
            raise KeyError(f"GPT-2 state dict lacks {theirs} (for {ours})")
        src = sd[theirs].t() if transposed else sd[theirs]
        dst = params[ours]
        if src.shape != dst.shape:
            raise ValueError(f"{theirs}: shape {tuple(src.shape)} does not fit {ours} {tuple(dst.shape)}")
        dst.copy_(src)
        used.add(theirs)
    extra = set(sd) - used - ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    if extra:
        raise KeyError(f"GPT-2 state dict has tensors gptdist does not use: {sorted(extra)[:5]}")


@torch.no_grad()
def to_hf_gpt2_state_dict(model: "GPT") -> dict[str, torch.Tensor]:
    """The inverse of load_hf_gpt2_state_dict: a state dict for `GPT2LMHeadModel(hf_config_from(cfg))`.

    Tensors are detached, contiguous CPU copies; a tied head is written as `lm_head.weight` equal to
    the token embedding, which is what GPT2LMHeadModel's load_state_dict expects.
    """
    _check_exportable(model.cfg)
    params = dict(model.named_parameters())
    out = {}
    for ours, theirs, transposed in _name_pairs(model.cfg):
        t = params[ours].detach()
        out[theirs] = (t.t() if transposed else t).contiguous().cpu().clone()
    if model.cfg.tie_embeddings:
        # a separate copy: safetensors refuses to save two names for one storage
        out["lm_head.weight"] = out["transformer.wte.weight"].clone()
    return out
