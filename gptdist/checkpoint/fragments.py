"""What this rank owns of the optimizer's fp32 state, read for a checkpoint and written back on resume.

A checkpoint stores, for every parameter of the plain GPT, its fp32 master weight and Adam's two moments, and it
stores them once: each rank writes only the part of each tensor-parallel piece that its optimizer owns, as flat
(1-D) fragments with their offset in the flattened piece. What a rank owns depends on the optimizer DeepSpeed built:

    ZeRO-1/2, and bf16 at ZeRO-0   a contiguous range of each parameter it holds a partition of (DeepSpeed's
                                   `_hp_mapping`: the range, its fp32 master and the moments' matching slices)
    ZeRO-3                         partition r of every parameter: [r*p, (r+1)*p) of its numel, p = ceil(numel/dp)
    ZeRO-0                         whole parameters (each data-parallel replica holds all of them): parameter i is
                                   written by data-parallel rank i mod dp; in fp32 the parameter is its own master,
                                   in bf16/fp16 DeepSpeed's unfused optimizer keeps an fp32 copy per parameter
    tensor parallelism             each tensor-parallel rank writes its own piece; a replicated parameter (norm
                                   gains, row-parallel biases) only on tensor-parallel rank 0
    pipeline                       each stage its own layers; the last stage's tied copy of the embedding is not
                                   written (it equals the first stage's, and is restored from it)

Nothing is gathered across ranks to save: the snapshot is this rank's own memory, copied. On resume every rank reads
back exactly the ranges it owns (any other layout: the ranges its new partition owns, from whichever files hold
them), so the same-layout resume is bitwise and another layout re-cuts the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch

from gptdist.checkpoint.layout_free import MOMENTS, LayoutFreeReader
from gptdist.engine.optim import base_optimizer


@dataclass
class Fragment:
    """Elements [start, start + numel) of the flattened tensor-parallel piece of `name`."""

    name: str
    start: int
    numel: int
    weight: torch.Tensor  # fp32, 1-D views into the optimizer's memory (copied by the snapshot)
    moments: Dict[str, torch.Tensor]


def optimizer_kind(engine) -> str:
    """'hp' (ZeRO-1/2, the bf16 optimizer of a pipeline), 'zero3', 'unfused' (ZeRO-0 in bf16 or fp16: an fp32 master
    per parameter) or 'plain' (ZeRO-0 in fp32: the torch optimizer itself)."""
    params = list(engine.module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if any(hasattr(p, "_hp_mapping") for p in params):
        return "hp"
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        return "unfused"
    if base_optimizer(engine) is not opt:
        raise RuntimeError(f"gptdist cannot checkpoint DeepSpeed's {type(opt).__name__} exactly")
    return "plain"


def _masters(engine) -> Dict[int, torch.Tensor]:
    """'unfused': id(model parameter) -> its fp32 master, as DeepSpeed pairs them (group by group, in order)."""
    opt = engine.optimizer
    return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2 and the bf16 optimizer create Adam's state on their first step, and only then link each parameter to
    its slice of it. Create the state (zeros, when there is none yet) and link it now, so that a resume can write
    the moments before that step and a save reads them as they are."""
    opt = engine.optimizer
    flats = (getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
             or getattr(opt, "fp32_groups_flat_partition", None)  # bf16 optimizer
             or getattr(opt, "fp32_partitioned_groups_flat", None))  # ZeRO-3
    if flats is None:
        return
    inner = opt.optimizer
    for flat in flats:
        state = inner.state[flat]
        if not state:
            state.update(step=step_tensor(inner, flat), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def step_tensor(optimizer, param: torch.Tensor) -> torch.Tensor:
    # torch's AdamW keeps `step` as a float32 scalar, on the parameter's device only for fused/capturable kernels.
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")


def owned(engine, param_names: Dict[int, str], topology) -> Iterator[Tuple[str, torch.nn.Parameter, int]]:
    """(canonical name, parameter, index) of every parameter whose state this rank may own a part of."""
    tp_rank = topology.tp_rank
    for i, param in enumerate(engine.module.parameters()):
        if getattr(param, "ds_pipe_replicated", False):
            continue
        if getattr(param, "tp_partition_dim", None) is None and tp_rank != 0:
            continue  # replicated across tensor parallelism: tensor-parallel rank 0 writes it
        yield param_names[id(param)], param, i


def _zero3_range(param, dp_rank: int) -> Tuple[int, int, int]:
    """(start, real numel, partition numel) of this rank's ZeRO-3 partition of `param`."""
    part = param.partition_numel()
    start = dp_rank * part
    return start, max(0, min(part, param.ds_numel - start)), part


def collect(engine, param_names: Dict[int, str], topology) -> List[Fragment]:
    """This rank's fragments (views into live optimizer memory: copy them before training goes on)."""
    kind = optimizer_kind(engine)
    _link_optimizer_state(engine)
    masters = _masters(engine) if kind == "unfused" else {}
    base = base_optimizer(engine)
    dp, dp_rank = topology.layout.dp, topology.dp_rank
    out: List[Fragment] = []
    for name, param, i in owned(engine, param_names, topology):
        if kind == "zero3":
            start, real, _ = _zero3_range(param, dp_rank)
            if real == 0:
                continue
            opt = param._z3_optimizer
            weight = opt.get_local_fp32_param(param)[:real]
            moments = {k: opt.get_local_fp32_param(param, k)[:real] for k in MOMENTS}
        elif kind == "hp":
            mapping = param._hp_mapping
            if mapping is None:
                continue
            start = mapping.lp_fragment_address.start
            weight = mapping.get_hp_fragment()
            moments = {k: mapping.get_hp_fragment(k) for k in MOMENTS if k in (mapping.optim_fragment or {})}
        else:
            if i % dp != dp_rank:
                continue
            start = 0
            master = masters[id(param)] if kind == "unfused" else param
            weight = master.detach().reshape(-1)
            state = base.state.get(master, {})
            moments = {k: state[k].reshape(-1) for k in MOMENTS if k in state}
        out.append(Fragment(name, start, weight.numel(), weight, moments))
    return out


def piece_shapes(engine, param_names: Dict[int, str], topology) -> Dict[str, Dict]:
    """{name: {shape of this rank's tensor-parallel piece, partition_dim, stride, stage}} for the index."""
    out = {}
    for name, param, _ in owned(engine, param_names, topology):
        shape = tuple(getattr(param, "ds_shape", param.shape))
        out[name] = {"shape": list(shape), "partition_dim": getattr(param, "tp_partition_dim", None),
                     "stride": getattr(param, "tp_partition_stride", 1), "stage": topology.pp_rank}
    return out


def restore(engine, param_names: Dict[int, str], reader: LayoutFreeReader, topology, precision: str) -> None:
    """Every parameter's fp32 master and moments from the checkpoint, for the ranges this rank's optimizer owns.

    The model's own weights were set from the checkpoint when it was built (materialize): in fp32 DeepSpeed's
    masters are exact copies of them, so only the moments are read then; in bf16 the masters are read too."""
    kind = optimizer_kind(engine)
    _link_optimizer_state(engine)
    masters = _masters(engine) if kind == "unfused" else {}
    base = base_optimizer(engine)
    keys = [k for k in MOMENTS if reader.has_moments] + ([None] if precision != "fp32" else [])
    tp, tp_rank, dp_rank = topology.layout.tp, topology.tp_rank, topology.dp_rank
    for param in engine.module.parameters():
        name = param_names[id(param)]
        for key in keys:
            if kind == "zero3":
                start, real, part = _zero3_range(param, dp_rank)
                value = torch.zeros(part, dtype=torch.float32)
                if real:
                    value[:real] = reader.piece_range(name, param, tp_rank, tp, start, start + real, key)
                opt = param._z3_optimizer
                opt.set_local_hp_param(value.to(param.ds_tensor.device), param, key)
            elif kind == "hp":
                mapping = param._hp_mapping
                if mapping is None:
                    continue
                a = mapping.lp_fragment_address
                target = mapping.get_hp_fragment(key)
                target.data.copy_(reader.piece_range(name, param, tp_rank, tp, a.start, a.start + a.numel, key))
            else:
                master = masters[id(param)] if kind == "unfused" else param
                if key is None:
                    master.data.copy_(reader.piece(name, param, tp_rank, tp).view_as(master))
                    continue
                state = base.state[master]
                if not state:
                    state.update(step=step_tensor(base, master), exp_avg=torch.zeros_like(master),
                                 exp_avg_sq=torch.zeros_like(master))
                state[key].copy_(reader.piece(name, param, tp_rank, tp, key).view_as(master))
