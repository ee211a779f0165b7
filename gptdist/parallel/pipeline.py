"""Cut the GPT into pipeline stages: a deepspeed.pipe.PipelineModule over the model's own pieces.

    [tied token embedding] [positions] [block 0] ... [block L-1] [final norm] [tied token embedding as head]

The token embedding appears twice under one TiedLayerSpec key: DeepSpeed keeps the first and last stages' copies
equal (one broadcast at start, an all-reduce of their gradients every step), which is the pipeline form of the
tied LM head. Blocks are balanced across stages by count (`type:BlockLayer`); the embedding lands on the first
stage and the norm and head on the last. Each layer wraps a module of an already built (and, under tensor
parallelism, already sharded) GPT, so the values are exactly those of the single-rank model.
"""

from __future__ import annotations

import contextlib
import functools
import io

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

TIED_KEY = "wte"


class TokenEmbeddingLayer(nn.Module):
    """First stage: token ids -> token embeddings (scaled when the model asks for it)."""

    def __init__(self, wte: nn.Module, scale: float):
        super().__init__()
        self.wte, self.scale = wte, scale

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        tok = self.wte(idx)
        return tok * self.scale if self.scale != 1.0 else tok


class TiedHeadLayer(nn.Module):
    """Last stage: hidden states scored against the same token embedding (tied under one key with the first
    stage's TokenEmbeddingLayer). Under tensor parallelism the head emits this rank's vocabulary slice of the
    logits and the loss function (the head's own) reads them without gathering.

    A module rather than a forward_fn on the tied spec: DeepSpeed saves and loads a pipeline layer's weights only
    when the layer is a module, and the last stage's copy of the embedding must be checkpointed like any other."""

    def __init__(self, wte: nn.Module, head: nn.Module):
        super().__init__()
        self.wte, self.head = wte, head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(self.head, "local_logits"):
            return self.head.local_logits(hidden, self.wte.weight)
        return self.head(hidden, self.wte.weight)


class PositionLayer(nn.Module):
    """Adds position information to the token embeddings (learned table or sinusoids), then dropout."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed  # the model's Embeddings module; its `wte` is used by TokenEmbeddingLayer instead

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        T = tok.size(1)
        if self.embed.pos_embedding == "learned":
            pos = self.embed.wpe(torch.arange(T, device=tok.device))
        else:
            pos = self.embed.pos_table[:T].to(tok.dtype)
        return self.embed.drop(tok + pos)


class BlockLayer(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.block(hidden)


class FinalNormLayer(nn.Module):
    def __init__(self, ln_f: nn.Module):
        super().__init__()
        self.ln_f = ln_f

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden)


def build_pipeline(model: nn.Module, topology, loss_fn, activation_checkpointing: bool):
    """A PipelineModule over `model`'s pieces for the given DeepSpeed topology."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    cfg = model.cfg
    if not cfg.tie_embeddings:
        raise ValueError("pipeline parallelism in gptdist needs model.tie_embeddings=true (the head shares wte)")
    scale = model.embed.scale
    wte = model.embed.wte
    # Keep positions and dropout on the first stage; the token table travels through the tied spec.
    del model.embed.wte
    layers = [
        TiedLayerSpec(TIED_KEY, TokenEmbeddingLayer, wte, scale, tied_weight_attr=["wte.weight"]),
        LayerSpec(PositionLayer, model.embed),
        *[LayerSpec(BlockLayer, block) for block in model.blocks],
        LayerSpec(FinalNormLayer, model.ln_f),
        TiedLayerSpec(TIED_KEY, TiedHeadLayer, wte, model.head, tied_weight_attr=["wte.weight"]),
    ]
    # PipelineModule prints its partition to stdout; gptdist's own log says what matters.
    with contextlib.redirect_stdout(io.StringIO()):
        return PipelineModule(
            layers=layers,
            topology=topology,
            loss_fn=loss_fn,
            partition_method="type:BlockLayer",
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
            activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
            checkpointable_layers=["BlockLayer"],
        )


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The pipeline's loss on full (unsharded) logits: mean cross-entropy in float32, like LMHead."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
