"""The four collectives tensor parallelism is built from, as autograd functions over an explicit group.

Notation of Shoeybi et al. (2019), "Megatron-LM", section 3:

* `copy_to_tp_region` (f): identity forward, all-reduce backward. Placed where a replicated activation
  enters a sharded computation: every rank's shard contributes a partial gradient for the input.
* `reduce_from_tp_region` (g): all-reduce forward, identity backward. Placed where partial results
  (a row-parallel product, a masked embedding lookup) become one replicated activation again.
* `gather_from_tp_region`: all-gather along the last dim forward, keep this rank's slice backward.
* `scatter_to_tp_region`: keep this rank's slice forward, all-gather backward.

The group is always passed in; nothing here remembers one. `group=None` means "no tensor
parallelism" (one rank, no communication at all), not torch.distributed's default WORLD group: a
tp=1 model then runs without a process group, and a caller can never reach WORLD by accident.
Every function returns its input unchanged when the group has one rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


class ShapeGroup:
    """A stand-in tensor-parallel group with a size and a rank and no communication: layers built with it on the
    meta device have exactly the shapes of that rank's shard (`gptdist plan` sizes layouts this way)."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self.size, self.rank = size, rank


def tp_size(group: Group) -> int:
    if group is None:
        return 1
    return group.size if isinstance(group, ShapeGroup) else dist.get_world_size(group)


def tp_rank(group: Group) -> int:
    if group is None:
        return 0
    return group.rank if isinstance(group, ShapeGroup) else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    # A fresh buffer: the input may be saved by another autograd node, and in-place collectives on it
    # would corrupt that node's backward.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _all_gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _own_slice_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    size, rank = tp_size(group), tp_rank(group)
    if x.size(-1) % size:
        raise ValueError(f"last dim {x.size(-1)} is not divisible by the tensor-parallel size {size}")
    width = x.size(-1) // size
    # contiguous: the slice is a view into the full tensor, which would otherwise stay alive
    return x[..., rank * width : (rank + 1) * width].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)  # a new tensor object, so autograd records this node

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """f: identity forward, all-reduce (sum) of the gradient backward."""
    return x if tp_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """g: all-reduce (sum) forward, identity backward."""
    return x if tp_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's x along the last dim (rank order); backward keeps this rank's slice."""
    return x if tp_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's equal slice of the last dim; backward all-gathers the gradient."""
    return x if tp_size(group) == 1 else _ScatterToTP.apply(x, group)
