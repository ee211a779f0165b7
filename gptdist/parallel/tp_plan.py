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

Values: every rank takes its piece of the full value. For a model built on a real device the full
value is the existing parameter (so the result equals the unsharded model). For a model built on
the meta device it is `init_value(name, full_shape, cfg, seed)`: one full tensor at a time on the
CPU, so the whole model is never materialized on any rank, and every layout gets the same numbers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from gptdist.model.config import GPTConfig
from gptdist.model.init import init_value
from gptdist.parallel.tp_comm import Group, tp_size
from gptdist.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from gptdist.parallel.tp_head import VocabParallelLMHead
from gptdist.parallel.tp_shard import REPLICATED, tag


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
        raise ValueError(f"tensor parallelism {tp} needs divisibility: " + "; ".join(problems) + f" not divisible by {tp}")


class _Source:
    """Where full values come from: the existing parameters, or `init_value` for a meta model."""

    def __init__(self, cfg: GPTConfig, seed: Optional[int], device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device

    def full(self, name: str, param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if param is None:
            return None
        if param.is_meta:
            return init_value(name, param.shape, self.cfg, self.seed)  # CPU; load_full copies the shard over
        return param.detach()


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
        device = torch.device(device if device is not None else "cpu")
    else:
        if seed is not None or device is not None:
            raise ValueError("seed= and device= are for meta-device models; this one already has values")
        device = next(model.parameters()).device
    src = _Source(cfg, seed, device)

    def column(old: nn.Linear, name: str, stride: int = 1, gather_output: bool = False) -> ColumnParallelLinear:
        new = ColumnParallelLinear(old.in_features, old.out_features, old.bias is not None, group, gather_output,
                                   stride=stride, device=device, dtype=old.weight.dtype)
        new.load_full(weight=src.full(f"{name}.weight", old.weight), bias=src.full(f"{name}.bias", old.bias))
        return new

    def row(old: nn.Linear, name: str) -> RowParallelLinear:
        new = RowParallelLinear(old.in_features, old.out_features, old.bias is not None, group,
                                device=device, dtype=old.weight.dtype)
        new.load_full(weight=src.full(f"{name}.weight", old.weight), bias=src.full(f"{name}.bias", old.bias))
        return new

    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        block.attn.qkv = column(block.attn.qkv, f"{p}.attn.qkv", stride=3)  # [q | k | v], heads inside each
        block.attn.proj = row(block.attn.proj, f"{p}.attn.proj")
        block.mlp.fc1 = column(block.mlp.fc1, f"{p}.mlp.fc1")
        block.mlp.fc2 = row(block.mlp.fc2, f"{p}.mlp.fc2")

    old = model.embed.wte
    wte = VocabParallelEmbedding(old.num_embeddings, old.embedding_dim, group, device=device, dtype=old.weight.dtype)
    wte.load_full(weight=src.full("embed.wte.weight", old.weight))
    model.embed.wte = wte
    if not cfg.tie_embeddings:
        # gather_output: a direct call lm_head(h) still returns full logits; the loss path only uses the weight
        model.lm_head = column(model.lm_head, "lm_head", gather_output=True)
    model.head = VocabParallelLMHead(group)

    _finish_replicated(model, src)
    return model


@torch.no_grad()
def _finish_replicated(model: nn.Module, src: _Source) -> None:
    """Materialize what is left on the meta device (replicated parameters and buffers) and tag every
    parameter not yet tagged as replicated, so each one answers `tp_partition_dim`."""
    for mod_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                full_name = f"{mod_name}.{name}" if mod_name else name
                value = src.full(full_name, param).to(device=src.device, dtype=param.dtype)
                setattr(module, name, nn.Parameter(value, requires_grad=param.requires_grad))
            if not hasattr(getattr(module, name), "tp_partition_dim"):
                tag(module, name, REPLICATED)
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        for name in meta_buffers:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=src.device)
        if meta_buffers:
            reset = getattr(module, "reset_buffers", None)
            if not callable(reset):
                raise ValueError(f"buffers {meta_buffers} of {mod_name!r} are on the meta device and cannot be refilled")
            reset()
