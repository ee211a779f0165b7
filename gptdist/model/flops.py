"""Parameter count and training FLOPs per token, computed from the config alone (no model is built)."""

from __future__ import annotations

from gptdist.model.config import GPTConfig


def count_parameters(cfg: GPTConfig, include_positions: bool = True) -> int:
    """Number of trainable parameters of `GPT(cfg)`; equals `sum(p.numel() for p in model.parameters())`.

    A tied LM head shares the token embedding and is counted once. `include_positions=False` leaves
    out the learned position table, which does no matrix multiplies per token (Kaplan et al. 2020,
    "Scaling Laws for Neural Language Models", section 2.1, count N without embeddings for the same
    reason; nanoGPT's `get_num_params(non_embedding=True)` drops only the positions, as here).
    Sinusoidal positions are a buffer, never a parameter.
    """
    d, f, b = cfg.d_model, cfg.ffn_dim, int(cfg.bias)
    layer_norm = d + b * d
    attention = (d * 3 * d + b * 3 * d) + (d * d + b * d)  # qkv, proj
    mlp = (d * f + b * f) + (f * d + b * d)  # fc1, fc2
    block = 2 * layer_norm + attention + mlp

    n = cfg.vocab_size * d + cfg.n_layer * block + layer_norm  # wte, blocks, ln_f
    if not cfg.tie_embeddings:
        n += cfg.vocab_size * d  # lm_head, no bias
    if include_positions and cfg.pos_embedding == "learned":
        n += cfg.seq_len * d
    return n


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs (forward + backward) per token at full context: 6*N + 12*n_layer*d_model*seq_len.

    6*N: each parameter does one multiply-add (2 FLOPs) per token in the forward pass and twice that
    in the backward pass (gradients for activations and for weights) (Kaplan et al. 2020, section 2.1).
    12*L*d*T: attention scores QK^T and the weighted sum of V, 2*T*d multiply-adds per layer per token
    forward, times 3 for forward+backward (Chowdhery et al. 2022, "PaLM", appendix B; the same
    estimate as nanoGPT's `estimate_mfu`). N excludes position embeddings and counts a tied head once;
    causal masking is ignored, as in both sources, so this is the FLOPs a dense kernel would do.
    """
    n = count_parameters(cfg, include_positions=False)
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
