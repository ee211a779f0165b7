"""Cut the GPT into pipeline stages: a deepspeed.pipe.PipelineModule whose layers each build their own piece.

    [tied token embedding] [positions] [block 0] ... [block L-1] [final norm] [tied token embedding as head]

The token embedding appears twice under one TiedLayerSpec key: DeepSpeed keeps the first and last stages' copies
equal (one broadcast at start, an all-reduce of their gradients every step), which is the pipeline form of the
tied LM head. Blocks are balanced across stages by count (`type:BlockLayer`); the embedding lands on the first
stage and the norm and head on the last.

Every layer is a LayerSpec, which DeepSpeed builds only on the stage that owns it: a stage constructs its own
layers and nothing else, on host or device. Each layer builds the plain model's module for its piece on the meta
device (`Block(cfg)` for block i), applies the tensor-parallel plan to it, and materializes this rank's shard
under the piece's canonical names (`blocks.i.`...), from the layout-free initialization or a checkpoint. The
values are therefore exactly those the single-rank model would have.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptdist.model.block import Block
from gptdist.model.config import GPTConfig
from gptdist.model.embedding import Embeddings
from gptdist.model.head import LMHead
from gptdist.parallel.materialize import ValueSource, materialize
from gptdist.parallel.tp.comm import Group, tp_rank, tp_size
from gptdist.parallel.tp.head import VocabParallelLMHead
from gptdist.parallel.tp.plan import shard_block, shard_token_embedding

TIED_KEY = "wte"


@dataclass
class StageLayers:
    """What every stage layer needs to build its piece: the model shape, the tensor-parallel group, the device and
    where the values come from. One object, shared by the layer specs (DeepSpeed passes it to the layers it builds)."""

    cfg: GPTConfig
    group: Group
    device: torch.device
    source: ValueSource

    def finish(self, module: nn.Module, prefix: str) -> nn.Module:
        materialize(module, self.source, device=self.device, prefix=prefix,
                    tp_rank=tp_rank(self.group), tp_size=tp_size(self.group))
        return module

    def token_embedding(self) -> nn.Module:
        wte = nn.Embedding(self.cfg.vocab_size, self.cfg.d_model, device="meta")
        if tp_size(self.group) > 1:
            wte = shard_token_embedding(wte, self.group)
        return self.finish(wte, "embed.wte")

    @property
    def tensor_parallel(self) -> bool:
        return tp_size(self.group) > 1


class TokenEmbeddingLayer(nn.Module):
    """First stage: token ids -> token embeddings (scaled when the model asks for it)."""

    def __init__(self, build: StageLayers):
        super().__init__()
        self.wte = build.token_embedding()
        # As Embeddings does: sqrt(d_model) when the model scales token vectors (Vaswani et al.).
        self.scale = math.sqrt(build.cfg.d_model) if build.cfg.scale_embeddings else 1.0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        tok = self.wte(idx)
        return tok * self.scale if self.scale != 1.0 else tok


class TiedHeadLayer(nn.Module):
    """Last stage: hidden states scored against its own copy of the token embedding (tied under one key with the
    first stage's TokenEmbeddingLayer). Under tensor parallelism the head emits this rank's vocabulary slice of the
    logits and the loss function (the head's own) reads them without gathering.

    A module rather than a forward_fn on the tied spec: DeepSpeed saves and loads a pipeline layer's weights only
    when the layer is a module, and the last stage's copy of the embedding must be checkpointed like any other."""

    def __init__(self, build: StageLayers):
        super().__init__()
        self.wte = build.token_embedding()
        if build.tensor_parallel:
            self.head = VocabParallelLMHead(build.group)
        else:
            self.head = LMHead()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(self.head, "local_logits"):
            return self.head.local_logits(hidden, self.wte.weight)
        return self.head(hidden, self.wte.weight)


class PositionLayer(nn.Module):
    """Adds position information to the token embeddings (learned table or sinusoids), then dropout."""

    def __init__(self, build: StageLayers):
        super().__init__()
        embed = Embeddings(build.cfg, device="meta")
        del embed.wte  # the token table is the tied layer's
        self.embed = build.finish(embed, "embed")

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        T = tok.size(1)
        if self.embed.pos_embedding == "learned":
            pos = self.embed.wpe(torch.arange(T, device=tok.device))
        else:
            pos = self.embed.pos_table[:T].to(tok.dtype)
        return self.embed.drop(tok + pos)


class BlockLayer(nn.Module):
    def __init__(self, build: StageLayers, index: int):
        super().__init__()
        block = Block(build.cfg, device="meta")
        if build.tensor_parallel:
            shard_block(block, build.group)
        self.block = build.finish(block, f"blocks.{index}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.block(hidden)


class FinalNormLayer(nn.Module):
    def __init__(self, build: StageLayers):
        super().__init__()
        cfg = build.cfg
        ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias, device="meta")
        self.ln_f = build.finish(ln_f, "ln_f")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden)


def build_pipeline(build: StageLayers, topology, loss_fn, activation_checkpointing: bool):
    """A PipelineModule for the given DeepSpeed topology; only this rank's stage is constructed."""
    # deepspeed: slow to import, only when a pipeline is built
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    cfg = build.cfg
    if not cfg.tie_embeddings:
        raise ValueError("pipeline parallelism in gptdist needs model.tie_embeddings=true (the head shares wte)")
    layers = [
        TiedLayerSpec(TIED_KEY, TokenEmbeddingLayer, build, tied_weight_attr=["wte.weight"]),
        LayerSpec(PositionLayer, build),
        *[LayerSpec(BlockLayer, build, i) for i in range(cfg.n_layer)],
        LayerSpec(FinalNormLayer, build),
        TiedLayerSpec(TIED_KEY, TiedHeadLayer, build, tied_weight_attr=["wte.weight"]),
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


def stage_parameter_names(module: nn.Module) -> Dict[int, str]:
    """{id(parameter): canonical name} for every parameter a stage holds (set by materialize)."""
    names = {}
    for local, param in module.named_parameters():
        name = getattr(param, "gptdist_name", None)
        if name is None:
            raise ValueError(f"pipeline parameter {local!r} was not built by gptdist's stage layers")
        names[id(param)] = name
    return names


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The pipeline's loss on full (unsharded) logits: mean cross-entropy in float32, like LMHead."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
