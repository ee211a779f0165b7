"""From a tensor-parallel shard back to the full model's tensors, and from full tensors to a shard.

Layout-free checkpoints and Hugging Face export need parameters under their canonical GPT names
(`blocks.0.attn.qkv.weight`, no wrapper prefixes) with their full shapes, whatever tp the run used.
Each parameter's split is read from the module that owns it (see shard.py), so this works on a
model wrapped by DeepSpeed or torch.compile as well.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from gptdist.model.init import canonical_name
from gptdist.parallel.tp.comm import Group, tp_rank, tp_size
from gptdist.parallel.tp.shard import Partition, partition_of, shard, unshard


def _entries(model: nn.Module) -> Dict[str, tuple[torch.Tensor, Partition]]:
    """state_dict key -> (tensor, partition), in state_dict order; buffers count as replicated."""
    partitions = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            partitions[id(param)] = partition_of(module, name)
    return {key: (t, partitions.get(id(t), Partition(None))) for key, t in model.state_dict(keep_vars=True).items()}


def full_parameter_name_map(model: nn.Module) -> Dict[str, str]:
    """Local state_dict key (maybe wrapped: `module.blocks.0...`) -> canonical full-model name."""
    return {key: canonical_name(key) for key in model.state_dict(keep_vars=True)}


def parameter_partitions(model: nn.Module) -> Dict[str, Partition]:
    """Canonical name -> Partition(dim, stride) for every state_dict entry (dim None: replicated).
    With the shards of all ranks, `shard.unshard` rebuilds a tensor offline, no process group needed."""
    return {canonical_name(key): part for key, (_, part) in _entries(model).items()}


def gather_full_tensor(local: torch.Tensor, partition: Partition, group: Group) -> torch.Tensor:
    """The full tensor from every rank's `local` piece (a collective: all ranks of `group` call it)."""
    size = tp_size(group)
    if partition.dim is None or size == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local, group=group)
    return unshard(pieces, partition)


def gather_full_state_dict(model: nn.Module, group: Group, *, dst: Optional[int] = None,
                           device: torch.device | str = "cpu") -> Dict[str, torch.Tensor]:
    """The unsharded model's state_dict (canonical names, full shapes), on `device`.

    A collective: every rank of `group` must call it. With `dst` (a rank within `group`) only that
    rank gets the tensors, the others an empty dict. One parameter is gathered at a time, so peak
    memory is one full tensor on the accelerator plus the result on `device` (default CPU).
    """
    keep = dst is None or tp_rank(group) == dst
    out = {}
    for key, (tensor, partition) in _entries(model).items():
        full = gather_full_tensor(tensor, partition, group)
        if keep:
            out[canonical_name(key)] = full.to(device)
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor], group: Group, *,
                         strict: bool = True) -> None:
    """Copy this rank's piece of each full tensor (canonical names) into the sharded model.

    No communication: every rank reads the same full tensors and cuts its own piece. `strict`
    raises on missing or unexpected names, like nn.Module.load_state_dict.
    """
    size, rank = tp_size(group), tp_rank(group)
    entries = {canonical_name(key): value for key, value in _entries(model).items()}
    if strict:
        missing, unexpected = sorted(entries.keys() - full.keys()), sorted(full.keys() - entries.keys())
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for name, (tensor, partition) in entries.items():
        if name not in full:
            continue
        piece = shard(full[name], partition, rank, size)
        if piece.shape != tensor.shape:
            raise ValueError(f"{name}: full shape {tuple(full[name].shape)} does not shard to {tuple(tensor.shape)}")
        tensor.copy_(piece)
