"""Give a model that was built on the meta device its values, one parameter at a time, on this rank only.

Every part of a run's model is first built as structure without storage (`torch.device("meta")`): the plain GPT or
one pipeline stage's layers, with the tensor-parallel plan already swapped in. `materialize` then walks the
parameters in order and, for each, asks a value source for exactly this rank's piece (its tensor-parallel shard
of the full tensor), creates it on the device, and hands it to `after` (under ZeRO-3: partitioned right away over
the data-parallel group). So no rank ever holds another stage's layers, another tensor-parallel rank's shard, or,
under ZeRO-3, more than one unpartitioned parameter at a time.

Value sources, all keyed by the canonical parameter name (`blocks.3.attn.qkv.weight`):

    InitValues        the layout-free initialization (init_value(name, full shape, cfg, seed)), cut to the shard
    TensorValues      full tensors already in memory (a plain model's own values, weights read by a tool)
    CheckpointValues  a layout-free checkpoint, reading only the byte ranges of this rank's piece
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from gptdist.model.config import GPTConfig
from gptdist.model.init import canonical_name, init_value
from gptdist.parallel.tp.shard import Partition, full_shape, partition_of, shard, tag


class ValueSource(Protocol):
    def piece(self, name: str, shape: Sequence[int], partition: Partition, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This rank's piece of the full tensor `name` of full shape `shape`, split as `partition`."""


class InitValues:
    """The layout-free initial values: the full tensor from its (seed, name) generator, then this rank's cut."""

    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed

    def piece(self, name, shape, partition, tp_rank, tp_size):
        return shard(init_value(name, shape, self.cfg, self.seed), partition, tp_rank, tp_size)


class TensorValues:
    """Full tensors by canonical name (the caller keeps them alive; each piece is a new tensor)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def piece(self, name, shape, partition, tp_rank, tp_size):
        if name not in self.tensors:
            raise ValueError(f"no value for parameter {name!r}")
        full = self.tensors[name].detach()
        if tuple(full.shape) != tuple(shape):
            raise ValueError(f"{name}: value of shape {tuple(full.shape)}, the model needs {tuple(shape)}")
        return shard(full, partition, tp_rank, tp_size)


class CheckpointValues:
    """A layout-free checkpoint (checkpoint.layout_free.LayoutFreeReader): reads only this rank's slices."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def piece(self, name, shape, partition, tp_rank, tp_size):
        if name not in self.reader.params:
            raise ValueError(f"the checkpoint {self.reader.folder} has no parameter {name!r}")
        value = self.reader.read_piece(name, partition, tp_rank, tp_size)
        expected = tuple(shard(torch.empty(shape, device="meta"), partition, tp_rank, tp_size).shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"{name}: the checkpoint's piece has shape {tuple(value.shape)}, this rank needs "
                             f"{expected}")
        return value


@torch.no_grad()
def materialize(module: nn.Module, source: ValueSource, *, device: torch.device | str, prefix: str = "",
                tp_rank: int = 0, tp_size: int = 1, dtype: Optional[torch.dtype] = None,
                after: Optional[Callable[[nn.Parameter], None]] = None) -> Dict[int, str]:
    """Replace every meta parameter of `module` by this rank's value, in place; refill meta buffers.

    `prefix` turns the module's own parameter names into the full model's (`blocks.3` for one block). Parameters
    that already have values are kept (and tagged replicated unless a plan said otherwise). Every parameter gets
    `gptdist_name`, its canonical name; the same map is returned as {id(parameter): name}. `after(param)` runs
    for each new parameter once it holds its value (ZeRO-3 partitions it there).
    """
    names: Dict[int, str] = {}
    for mod_name, sub in module.named_modules():
        for leaf, param in list(sub.named_parameters(recurse=False)):
            name = canonical_name(".".join(p for p in (prefix, mod_name, leaf) if p))
            part = partition_of(sub, leaf)
            if param.is_meta:
                value = source.piece(name, full_shape(param.shape, part, tp_size), part, tp_rank, tp_size)
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: value of shape {tuple(value.shape)}, parameter {tuple(param.shape)}")
                new = nn.Parameter(value.to(device=device, dtype=dtype or param.dtype),
                                   requires_grad=param.requires_grad)
                del value
                setattr(sub, leaf, new)
                param = new
                tag(sub, leaf, part)
                param.gptdist_name = name
                if after is not None:
                    after(param)
            else:
                if not hasattr(param, "tp_partition_dim"):
                    tag(sub, leaf, part)
                param.gptdist_name = name
            names[id(param)] = name
        meta_buffers = [n for n, b in sub.named_buffers(recurse=False) if b.is_meta]
        for leaf in meta_buffers:
            sub._buffers[leaf] = torch.empty_like(sub._buffers[leaf], device=device)
        if meta_buffers:
            reset = getattr(sub, "reset_buffers", None)
            if not callable(reset):
                raise ValueError(f"buffers {meta_buffers} of {mod_name!r} are on the meta device and cannot be "
                                 "refilled")
            reset()
    return names


class Zero3Partitioner:
    """`after` for materialize under ZeRO-3: each parameter becomes a ZeRO-3 parameter (partitioned over the
    data-parallel group, this rank keeping 1/dp of it) as soon as it holds its value.

    The first parameter goes through `deepspeed.zero.Init(module=...)` with the run's DeepSpeed config (it sets
    ZeRO-3's process group, persistence threshold and dtype); the others through the converter DeepSpeed attaches
    to every ZeRO parameter, which is what its engine uses for parameters added after construction."""

    def __init__(self, ds_config: dict, dp_group, mpu, dtype: torch.dtype) -> None:
        self.ds_config, self.dp_group, self.mpu, self.dtype = ds_config, dp_group, mpu, dtype
        self._first: Optional[nn.Parameter] = None

    def __call__(self, param: nn.Parameter) -> None:
        if self._first is None:
            # deepspeed: slow to import, only under ZeRO-3
            import deepspeed

            holder = nn.Module()
            holder.register_parameter("p", param)
            deepspeed.zero.Init(module=holder, data_parallel_group=self.dp_group, config_dict_or_path=self.ds_config,
                                mem_efficient_linear=False, dtype=self.dtype, mpu=self.mpu)
            self._first = param
        else:
            self._first.convert_to_zero_parameters(param_list=[param])
