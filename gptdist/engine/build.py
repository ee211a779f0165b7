"""Build the model with the layout's parallelism applied and wrap it in a DeepSpeed engine.

The order follows torchtitan's: plain model (on the meta device when it will be sharded) -> tensor-parallel plan
-> activation checkpointing -> pipeline stages -> DeepSpeed (ZeRO, optimizer, schedule).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from gptdist.config import RunConfig
from gptdist.engine.ds_config import build_ds_config
from gptdist.engine.optim import build_optimizer, build_scheduler
from gptdist.engine.steps import PipelineStep, PlainStep
from gptdist.model import GPT
from gptdist.parallel.activation_checkpointing import apply_activation_checkpointing
from gptdist.parallel.layout import Layout
from gptdist.parallel.materialize import CheckpointValues, InitValues, Zero3Partitioner, materialize
from gptdist.parallel.pipeline import StageLayers, build_pipeline, cross_entropy_loss, stage_parameter_names
from gptdist.parallel.tp.comm import tp_rank, tp_size
from gptdist.parallel.tp.grad import tp_grad_norm
from gptdist.parallel.tp.head import VocabParallelLMHead
from gptdist.parallel.tp.plan import check_tp_divisibility, shard_structure


def value_source(cfg: RunConfig, weights=None):
    """Where the parameters' values come from: a layout-free checkpoint (another layout's resume), or the
    layout-free initialization from train.seed."""
    return CheckpointValues(weights) if weights is not None else InitValues(cfg.model, cfg.train.seed)


def build_model(cfg: RunConfig, layout: Layout, topology, device: torch.device, weights=None,
                partition=None) -> Tuple[torch.nn.Module, Dict[int, str]]:
    """The plain GPT (pp = 1) as this rank holds it, and {id(parameter): canonical name}.

    Built on the meta device, given the tensor-parallel plan there, and only then materialized one parameter at a
    time with this rank's shard of its value (see parallel/materialize.py). `partition` (ZeRO-3) partitions each
    parameter over the data-parallel group as soon as it has its value, so the unpartitioned model never exists.
    `weights` (a LayoutFreeReader) gives a checkpoint's values instead of the initial ones."""
    model = GPT(cfg.model, seed=None, device="meta")
    group = topology.tp_group if layout.tp > 1 else None
    if layout.tp > 1:
        check_tp_divisibility(cfg.model, layout.tp)
        shard_structure(model, group)
    dtype = partition.dtype if partition is not None else None
    param_names = materialize(model, value_source(cfg, weights), device=device, tp_rank=tp_rank(group),
                        tp_size=tp_size(group), dtype=dtype, after=partition)
    return model, param_names


def build_training_engine(cfg: RunConfig, rank, weights=None, drills=None):
    """The DeepSpeed engine over this rank's part of the model (rank: a started engine.process.Rank), the step
    function that drives it (PlainStep for pp = 1, PipelineStep for pp > 1), and each parameter's canonical name by
    id (pipeline stages rename them). `weights`: a checkpoint's layout-free reader, whose values the parameters take
    instead of the initial ones."""
    # deepspeed: slow to import, only when an engine is built
    import deepspeed

    layout, topology, precision, device_type = rank.layout, rank.topology, rank.precision, rank.device_type
    device = rank.device
    ds_config = build_ds_config(cfg, layout, precision)
    if layout.pp > 1:
        group = topology.tp_group if layout.tp > 1 else None
        build = StageLayers(cfg.model, group, device, value_source(cfg, weights))
        if layout.tp > 1:
            check_tp_divisibility(cfg.model, layout.tp)
            # The last stage emits vocab-sharded logits; the vocab-parallel loss reads them without gathering.
            loss_fn = VocabParallelLMHead(group).loss
        else:
            loss_fn = cross_entropy_loss
        module = build_pipeline(build, topology.topo, loss_fn, cfg.parallel.activation_checkpointing)
        param_names = stage_parameter_names(module)
        mpu = None  # the pipeline engine builds its own grid from the topology and refuses an mpu
    else:
        partition = None
        if layout.zero_stage == 3:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
            partition = Zero3Partitioner(ds_config, topology.dp_group, topology, dtype)
        module, param_names = build_model(cfg, layout, topology, device, weights, partition)
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(module)
        mpu = topology
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=build_optimizer(module, cfg.train, device_type),
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
        config=ds_config,
        mpu=mpu,
        dist_init_required=False,
    )
    _clip_with_layout_aware_norm(engine, topology, pipeline=layout.pp > 1)
    if layout.pp == 1 and layout.dp == 1 and layout.zero_stage == 0:
        # One data-parallel rank has nothing to reduce, but DeepSpeed would still flatten every gradient into
        # buckets, all-reduce them over a group of one and copy them back, every step (its pipeline engine turns
        # this off the same way). ZeRO's optimizers reduce through this path, hence stage 0 only.
        engine.enable_backward_allreduce = False
    step_fn = PipelineStep(engine) if layout.pp > 1 else PlainStep(engine, layout.grad_accum, drills)
    return engine, step_fn, param_names


def _clip_with_layout_aware_norm(engine, topology, pipeline: bool) -> None:
    """Gradient clipping without ZeRO and mixed precision (the ZeRO optimizers clip and record their own norm).

    DeepSpeed's own routine here drops the norm it computes, and under a pipeline it counts replicated parameters
    only on the first stage (it asks the grid's pipe x tensor rank where it means the tensor rank). This one counts
    every parameter once: tensor-sharded ones on every rank, replicated ones on tensor rank 0, the tied embedding
    on the first stage only, summed over the tensor (x pipe) group, and keeps the norm for the metrics.
    """
    max_norm = engine.gradient_clipping()
    group = engine.mpu.get_model_parallel_group() if pipeline else topology.tp_group
    all_params = list(engine.module.parameters())  # walked once: the module tree does not change while training
    counted = [p for p in all_params if not getattr(p, "ds_pipe_replicated", False)]

    def clip_and_record() -> None:
        params = [p for p in counted if p.grad is not None]
        norm = tp_grad_norm(params, topology.tp_group, group)
        engine._global_grad_norm = norm
        # A non-finite gradient (NaN/inf loss) must not reach the weights: drop every gradient, so the optimizer
        # leaves all parameters untouched, and report an overflow, so DeepSpeed counts the step as skipped and
        # holds the learning-rate schedule, as its ZeRO optimizers do for the same case.
        skip = not bool(torch.isfinite(norm))
        engine.optimizer.overflow = skip
        if skip:
            for p in all_params:
                p.grad = None
            return
        coef = float(max_norm / (norm + 1e-6))
        if coef < 1:
            torch._foreach_mul_([p.grad.detach() for p in all_params if p.grad is not None], coef)

    engine.clip_fp32_gradients = clip_and_record
