"""Turn a plain GPT into this rank's tensor-parallel shard of it, in place.

Which module becomes what (Megatron-LM's split of a Transformer block):

    blocks.i.attn.qkv   column-parallel, stride 3: this rank's heads of q, of k and of v
    blocks.i.attn.proj  row-parallel (bias replicated)
    blocks.i.mlp.fc1    column-parallel
    blocks.i.mlp.fc2    row-parallel (bias replicated)
    embed.wte           vocab-parallel embedding (rows split)
    lm_head (untied)    column-parallel over the vocabulary (rows split like wte)
    head                VocabParallelLMHead: loss without gathering the logits
    everything else     replicated: LayerNorms, embed.wpe, sinusoidal table

Each block then does two all-reduces forward (after proj, after fc2) and two backward (before qkv,
before fc1), plus one each for the embedding and the head.

Values: the swap itself creates the new layers on the meta device (structure only); `materialize` then fills
each parameter with this rank's piece of its full value. For a model that already has values those are the
existing parameters (so the result equals the unsharded model); for a model built on the meta device they are
`init_value(name, full_shape, cfg, seed)`, one full tensor at a time on the CPU, so the whole model is never
materialized on any rank and every layout gets the same numbers. A pipeline stage applies the same swaps to just
its own pieces (`shard_block`, `shard_token_embedding`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from gptdist.model.config import GPTConfig
from gptdist.model.init import canonical_name
from gptdist.parallel.materialize import InitValues, TensorValues, materialize
from gptdist.parallel.tp.comm import Group, tp_rank, tp_size
from gptdist.parallel.tp.head import VocabParallelLMHead
from gptdist.parallel.tp.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def check_tp_divisibility(cfg: GPTConfig, tp: int) -> None:
    """ValueError unless every split dimension of `cfg` divides evenly into `tp` shards."""
    problems = []
    if cfg.n_head % tp:
        problems.append(f"n_head={cfg.n_head} (attention heads are split across ranks)")
    if cfg.vocab_size % tp:
        padded = -(-cfg.vocab_size // (64 * tp)) * 64 * tp
        problems.append(f"vocab_size={cfg.vocab_size} (pad it, e.g. to {padded})")
    if cfg.ffn_dim % tp:
        problems.append(f"ffn_dim={cfg.ffn_dim} (the MLP hidden units are split across ranks)")
    if problems:
        raise ValueError(f"tensor parallelism {tp} needs divisibility: {'; '.join(problems)} not divisible by {tp}")


def shard_block(block: nn.Module, group: Group) -> None:
    """Swap one block's four projections for tensor-parallel layers on the meta device (values come later)."""
    meta = torch.device("meta")
    attn, mlp = block.attn, block.mlp
    attn.qkv = _column(attn.qkv, group, meta, stride=3)  # [q | k | v], heads contiguous inside each
    attn.proj = _row(attn.proj, group, meta)
    mlp.fc1 = _column(mlp.fc1, group, meta)
    mlp.fc2 = _row(mlp.fc2, group, meta)


def shard_token_embedding(wte: nn.Embedding, group: Group) -> VocabParallelEmbedding:
    """The vocabulary-parallel replacement of a token embedding, on the meta device."""
    return VocabParallelEmbedding(wte.num_embeddings, wte.embedding_dim, group, device="meta", dtype=wte.weight.dtype)


def _column(old: nn.Linear, group: Group, device, stride: int = 1, gather_output: bool = False) -> ColumnParallelLinear:
    return ColumnParallelLinear(old.in_features, old.out_features, old.bias is not None, group, gather_output,
                                stride=stride, device=device, dtype=old.weight.dtype)


def _row(old: nn.Linear, group: Group, device) -> RowParallelLinear:
    return RowParallelLinear(old.in_features, old.out_features, old.bias is not None, group, device=device,
                             dtype=old.weight.dtype)


def shard_structure(model: nn.Module, group: Group) -> None:
    """Swap every module of the plan (see the module docstring) for its tensor-parallel form, on meta."""
    for block in model.blocks:
        shard_block(block, group)
    model.embed.wte = shard_token_embedding(model.embed.wte, group)
    if not model.cfg.tie_embeddings:
        # gather_output: a direct call lm_head(h) still returns full logits; the loss path only uses the weight
        model.lm_head = _column(model.lm_head, group, torch.device("meta"), gather_output=True)
    model.head = VocabParallelLMHead(group)


def apply_tensor_parallel(model: nn.Module, group: Group, seed: Optional[int] = None, *,
                          device: torch.device | str | None = None) -> nn.Module:
    """Shard the bare GPT `model` (not a DeepSpeed/DDP wrapper) over `group` in place and return it.

    `group=None` (or a one-rank group) gives tp=1: same modules, no communication. For a model on
    the meta device, `seed` is required (the values are `init_value(..., seed)`) and the shard is
    created on `device` (default CPU); otherwise `seed` and `device` must be left out and the shard
    stays where the model is. All ranks of the group must call this with the same arguments.
    """
    cfg: GPTConfig = model.cfg
    check_tp_divisibility(cfg, tp_size(group))
    if getattr(model, "head", None) is None:
        raise ValueError("apply_tensor_parallel needs the GPT's `head` module (the loss is computed there)")
    if any(isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)) for m in model.modules()):
        raise ValueError("the model is already tensor-parallel")

    meta = any(p.is_meta for p in model.parameters())
    if meta:
        if seed is None:
            raise ValueError("a model on the meta device has no values: pass seed= to initialize its shards")
        source = InitValues(cfg, seed)
        device = torch.device(device if device is not None else "cpu")
    else:
        if seed is not None or device is not None:
            raise ValueError("seed= and device= are for meta-device models; this one already has values")
        device = next(model.parameters()).device
        # The old full parameters stay referenced here until every shard has been cut from them.
        source = TensorValues({canonical_name(n): p for n, p in model.named_parameters()})
    shard_structure(model, group)
    materialize(model, source, device=device, tp_rank=tp_rank(group), tp_size=tp_size(group))
    return model
