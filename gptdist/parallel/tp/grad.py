"""The gradient norm of a tensor-parallel model, counted the way the unsharded model would count it.

A sharded parameter's gradient is split across the tensor-parallel ranks, so its squared norm is
the sum of every rank's part. A replicated parameter (LayerNorm, position table, row-parallel bias)
has the same full gradient on every rank, so it must be counted once, on tp rank 0, not tp times.
Clipping with a norm computed per rank would scale the ranks' updates differently and let the
replicated copies drift apart. DeepSpeed applies this same rule (given an `mpu`, through the
`tensor_model_parallel` attribute set by shard.tag); this is the reference for checking it.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from gptdist.parallel.tp.comm import Group, tp_rank


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def tp_grad_norm(parameters: Iterable[torch.Tensor], tp_group: Group,
                 model_parallel_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Global L2 norm (float32 scalar, the same on every rank) of the gradients of `parameters`.

    `model_parallel_group` is the group the squares are summed over when pipeline stages also hold
    different parameters (tp x pp ranks); by default the tensor-parallel group. Data-parallel
    replicas are not involved: their gradients are already averaged, hence equal.
    """
    parameters = list(parameters)
    count_replicated = tp_rank(tp_group) == 0
    grads = [p.grad.detach() for p in parameters if p.grad is not None and (count_replicated or is_tp_sharded(p))]
    total = None
    if grads:
        # One fused pass (per-tensor norms in float32, no squared temporaries of every gradient), then the sum of
        # their squares: the same norm as summing every element's square.
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.stack(norms).square().sum()
    if total is None:
        # on the parameters' device: an NCCL all-reduce needs every rank's tensor on the GPU
        device = parameters[0].device if parameters else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=device)
    group = model_parallel_group if model_parallel_group is not None else tp_group
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total.sqrt()
