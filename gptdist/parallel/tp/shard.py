"""How a full tensor maps to its tensor-parallel shards and back, and how a shard says so.

A sharded parameter is described by (dim, stride): the full tensor is cut into `stride` equal
chunks along `dim`, and rank r keeps the r-th of `size` equal pieces of every chunk, concatenated.
stride=1 is a plain contiguous split. stride=3 is the fused qkv projection: its [q | k | v] output
rows are three chunks, and each rank must hold its own heads of q, of k and of v, not a contiguous
third of the rows (which would give rank 0 all of q and part of k). Heads are contiguous inside each
chunk, so "heads [r*h/tp, (r+1)*h/tp) of each of q, k, v" is exactly this rule.

Every tensor-parallel layer records, per parameter, `tp_partition_dim` (None when replicated) and
`tp_partition_stride` on the parameter itself, and the same in the module's `tp_partitions` dict,
which survives code that swaps parameter objects (attributes on a Parameter are lost then).
`tensor_model_parallel` is set as well: it is the attribute DeepSpeed's gradient-norm code checks
(`deepspeed.runtime.utils.is_model_parallel_parameter`) to count a sharded parameter on every
tensor-parallel rank but a replicated one only on tensor-parallel rank 0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn


class Partition(NamedTuple):
    dim: Optional[int]  # None: replicated, every rank holds the full tensor
    stride: int = 1


REPLICATED = Partition(None, 1)


def shard(full: torch.Tensor, partition: Partition, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of `full` (a new tensor, so the full one can be freed)."""
    dim, stride = partition
    if dim is None or size == 1:
        return full.clone()
    n = full.size(dim)
    if n % (stride * size):
        raise ValueError(f"dim {dim} of size {n} cannot be split into {stride} chunks of {size} equal shards")
    width = n // stride // size
    pieces = [chunk.narrow(dim, rank * width, width) for chunk in full.chunk(stride, dim)]
    return torch.cat(pieces, dim)


def unshard(shards: Sequence[torch.Tensor], partition: Partition) -> torch.Tensor:
    """The inverse of `shard`: every rank's piece, in rank order -> the full tensor."""
    dim, stride = partition
    if dim is None or len(shards) == 1:
        return shards[0].clone()
    per_rank = [s.chunk(stride, dim) for s in shards]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(len(shards))], dim)


def full_shape(local_shape: Sequence[int], partition: Partition, size: int) -> tuple[int, ...]:
    shape = list(local_shape)
    if partition.dim is not None:
        shape[partition.dim] *= size
    return tuple(shape)


def tag(module: nn.Module, name: str, partition: Partition) -> None:
    """Record how `module.<name>` is split, on the parameter and on the module."""
    param = getattr(module, name)
    param.tp_partition_dim = partition.dim
    param.tp_partition_stride = partition.stride
    param.tensor_model_parallel = partition.dim is not None
    if not hasattr(module, "tp_partitions"):
        module.tp_partitions = {}
    module.tp_partitions[name] = partition


def partition_of(module: nn.Module, name: str) -> Partition:
    """How `module.<name>` is split; parameters of ordinary modules are replicated."""
    return getattr(module, "tp_partitions", {}).get(name, REPLICATED)
