"""Build the model with the layout's parallelism applied and wrap it in a DeepSpeed engine.

The order follows torchtitan's: plain model (on the meta device when it will be sharded) -> tensor-parallel plan
-> activation checkpointing -> pipeline stages -> DeepSpeed (ZeRO, optimizer, schedule).
"""

from __future__ import annotations

import logging

import torch

from gptdist.config import RunConfig
from gptdist.model import GPT
from gptdist.parallel.layout import Layout
from gptdist.train.ds_config import build_ds_config
from gptdist.train.optim import build_optimizer, build_scheduler


def quiet_deepspeed(is_main: bool) -> None:
    """DeepSpeed logs its set-up at INFO from every rank; keep rank 0's warnings and silence the rest."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING if is_main else logging.ERROR)


def build_model(cfg: RunConfig, layout: Layout, topology, device: torch.device, weights=None) -> torch.nn.Module:
    """The GPT as this rank holds it. Every parameter's full value comes from its own (seed, name) generator, so
    every layout starts from the same weights; under tensor parallelism the model is built on the meta device and
    each rank materializes only its own shard. `weights` (a LayoutFreeReader) replaces the initial values with a
    checkpoint's, cut for this layout."""
    if layout.tp == 1:
        model = GPT(cfg.model, seed=cfg.train.seed)
    else:
        from gptdist.parallel.tp_plan import apply_tensor_parallel

        with torch.device("meta"):
            model = GPT(cfg.model, seed=None)
        model = apply_tensor_parallel(model, topology.tp_group, seed=cfg.train.seed, device=device)
    if weights is not None:
        from gptdist.parallel.tp_state import load_full_state_dict

        load_full_state_dict(model, weights.state_dict(), topology.tp_group)
    return model


def build_training_engine(cfg: RunConfig, layout: Layout, topology, device_type: str, precision: str, weights=None,
                          faults=None):
    """The DeepSpeed engine over this rank's part of the model, the step function that drives it (PlainStep for
    pp = 1, PipelineStep for pp > 1), and each parameter's canonical name by id (pipeline stages rename them)."""
    import deepspeed

    from gptdist.parallel.activation_checkpointing import apply_activation_checkpointing
    from gptdist.parallel.pipeline import build_pipeline, cross_entropy_loss
    from gptdist.train.steps import PipelineStep, PlainStep

    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    model = build_model(cfg, layout, topology, device, weights)
    names = {id(p): name for name, p in model.named_parameters()}
    if layout.pp > 1:
        # Under tensor parallelism the last stage emits vocab-sharded logits; the head's own loss reads them.
        loss_fn = getattr(model.head, "loss", cross_entropy_loss)
        module = build_pipeline(model, topology.topo, loss_fn, cfg.parallel.activation_checkpointing)
        mpu = None  # the pipeline engine builds its own grid from the topology and refuses an mpu
    else:
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        module, mpu = model, topology
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=build_optimizer(module, cfg.train, device_type),
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
        config=build_ds_config(cfg, layout, precision),
        mpu=mpu,
        dist_init_required=False,
    )
    _clip_with_layout_aware_norm(engine, topology, pipeline=layout.pp > 1)
    step_fn = PipelineStep(engine) if layout.pp > 1 else PlainStep(engine, layout.grad_accum, faults)
    return engine, step_fn, names


def _clip_with_layout_aware_norm(engine, topology, pipeline: bool) -> None:
    """Gradient clipping without ZeRO and mixed precision (the ZeRO optimizers clip and record their own norm).

    DeepSpeed's own routine here drops the norm it computes, and under a pipeline it counts replicated parameters
    only on the first stage (it asks the grid's pipe x tensor rank where it means the tensor rank). This one counts
    every parameter once: tensor-sharded ones on every rank, replicated ones on tensor rank 0, the tied embedding
    on the first stage only, summed over the tensor (x pipe) group, and keeps the norm for the metrics.
    """
    from gptdist.parallel.tp_grad import tp_grad_norm

    max_norm = engine.gradient_clipping()
    group = engine.mpu.get_model_parallel_group() if pipeline else topology.tp_group

    def clip_and_record() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
        norm = tp_grad_norm(params, topology.tp_group, group)
        engine._global_grad_norm = norm
        # A non-finite gradient (NaN/inf loss) must not reach the weights: drop every gradient, so the optimizer
        # leaves all parameters untouched, and report an overflow, so DeepSpeed counts the step as skipped and
        # holds the learning-rate schedule, as its ZeRO optimizers do for the same case.
        skip = not bool(torch.isfinite(norm))
        engine.optimizer.overflow = skip
        if skip:
            for p in engine.module.parameters():
                p.grad = None
            return
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for p in engine.module.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(coef)

    engine.clip_fp32_gradients = clip_and_record
