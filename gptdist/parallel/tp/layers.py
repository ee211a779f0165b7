"""Tensor-parallel drop-ins for nn.Linear and nn.Embedding (Shoeybi et al. 2019, "Megatron-LM").

A column-parallel linear followed by a row-parallel one needs one all-reduce forward and one
backward for the pair: the column layer splits the output features (each rank computes its own
attention heads or its own slice of the MLP hidden units, and the nonlinearity in between is
elementwise, so no communication is needed there), the row layer splits the input features and
sums the partial products.

Parameters are created zero-filled (or on the meta device); `load_full` fills them with this
rank's piece of the full tensor, which every rank must pass identically. The vocabulary-parallel
loss and LM head live in head.py and are re-exported here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptdist.parallel.tp.comm import (
    Group,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
    tp_rank,
    tp_size,
)
from gptdist.parallel.tp.head import VocabParallelLMHead, vocab_parallel_cross_entropy
from gptdist.parallel.tp.shard import REPLICATED, Partition, partition_of, shard, tag

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "vocab_parallel_cross_entropy",
]


def _divide(n: int, size: int, what: str) -> int:
    if n % size:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {size}")
    return n // size


def _local_shape(param: torch.Tensor) -> tuple:
    # A ZeRO-3 parameter holds only its flat partition; its shape as the layer sees it is ds_shape.
    return tuple(getattr(param, "ds_shape", param.shape))


class _TPModule(nn.Module):
    """Holds the group, this rank's place in it, and the shared `load_full`."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group
        self.tp_rank = tp_rank(group)
        self.tp_size = tp_size(group)

    def _param(self, shape: tuple[int, ...], device, dtype) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    @torch.no_grad()
    def load_full(self, **full: Optional[torch.Tensor]) -> None:
        """`load_full(weight=W, bias=b)`: keep this rank's piece of each full tensor (any device or
        dtype; the piece is cut where the full tensor lives, then copied into the parameter)."""
        for name, value in full.items():
            param = getattr(self, name)
            if value is None or param is None:
                continue
            if param.is_meta:
                raise ValueError(f"{name} is on the meta device: create the layer on a real device to load values")
            piece = shard(value, partition_of(self, name), self.tp_rank, self.tp_size)
            if piece.shape != param.shape:
                raise ValueError(f"{name}: full tensor {tuple(value.shape)} gives a shard {tuple(piece.shape)}, "
                                 f"expected {tuple(param.shape)}")
            param.copy_(piece)


class ColumnParallelLinear(_TPModule):
    """y = x W^T + b with W's output rows split: this rank computes out_features/tp of the outputs.

    The input passes through f, so its gradient sums every rank's contribution. `gather_output`
    concatenates the shards (full y on every rank); otherwise y stays split, ready for a
    RowParallelLinear. `stride` > 1 marks a fused weight whose rows are `stride` separately split
    chunks (stride=3 for [q | k | v]); such an output cannot be gathered into the full layout.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: Group = None,
                 gather_output: bool = False, *, stride: int = 1, device=None, dtype=None):
        super().__init__(group)
        if gather_output and stride != 1:
            raise ValueError("gather_output needs stride=1: a strided shard does not concatenate to the full layout")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        local_out = _divide(out_features, self.tp_size * stride, "out_features/stride") * stride
        self.weight = self._param((local_out, in_features), device, dtype)
        self.bias = self._param((local_out,), device, dtype) if bias else None
        tag(self, "weight", Partition(0, stride))
        if bias:
            tag(self, "bias", Partition(0, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)
        return gather_from_tp_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {_local_shape(self.weight)[0]}), bias={self.bias is not None}, "
                f"tp={self.tp_rank}/{self.tp_size}")


class RowParallelLinear(_TPModule):
    """y = x W^T + b with W's input columns split: each rank multiplies its slice of x, g sums them.

    `input_is_parallel=False` takes a full x and keeps this rank's slice first. The bias is
    replicated and added once, after the reduction (added before, it would be counted tp times).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: Group = None,
                 input_is_parallel: bool = True, *, device=None, dtype=None):
        super().__init__(group)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        local_in = _divide(in_features, self.tp_size, "in_features")
        self.weight = self._param((out_features, local_in), device, dtype)
        self.bias = self._param((out_features,), device, dtype) if bias else None
        tag(self, "weight", Partition(1, 1))
        if bias:
            tag(self, "bias", REPLICATED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {_local_shape(self.weight)[1]}), "
                f"out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


class VocabParallelEmbedding(_TPModule):
    """nn.Embedding with rows [r*V/tp, (r+1)*V/tp) on rank r.

    Each rank looks up the ids it owns and writes zeros for the others; g then sums the ranks'
    outputs, so exactly one rank contributes each token's vector. The zeros are written with a mask
    on the output (not just by clamping ids), so foreign ids also get no gradient in the local rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group = None, *, device=None, dtype=None):
        super().__init__(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _divide(num_embeddings, self.tp_size, "num_embeddings")
        self.vocab_start, self.vocab_end = self.tp_rank * local, (self.tp_rank + 1) * local
        self.weight = self._param((local, embedding_dim), device, dtype)
        tag(self, "weight", Partition(0, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        foreign = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(foreign, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"tp={self.tp_rank}/{self.tp_size}")
