"""Build the model and wrap it in a DeepSpeed engine, as the layout asks."""

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


def build_model(cfg: RunConfig) -> torch.nn.Module:
    # Every parameter from its own (seed, name) generator: the same values whatever the layout or rank count.
    return GPT(cfg.model, seed=cfg.train.seed)


def build_training_engine(cfg: RunConfig, layout: Layout, topology, device_type: str, precision: str):
    """The model with the layout's parallelism applied, wrapped in DeepSpeed's engine, and the step function that
    drives that engine (PlainStep for pp = 1, PipelineStep for pp > 1)."""
    import deepspeed

    from gptdist.parallel.activation_checkpointing import apply_activation_checkpointing
    from gptdist.parallel.pipeline import build_pipeline, cross_entropy_loss
    from gptdist.train.steps import PipelineStep, PlainStep

    model = build_model(cfg)
    if layout.tp > 1:
        raise NotImplementedError  # replaced when the tensor-parallel plan lands
    if layout.pp > 1:
        module = build_pipeline(model, topology.topo, cross_entropy_loss, cfg.parallel.activation_checkpointing)
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
    _keep_clip_norm(engine)
    step_fn = PipelineStep(engine) if layout.pp > 1 else PlainStep(engine, layout.grad_accum)
    return engine, step_fn


def _keep_clip_norm(engine) -> None:
    """Without ZeRO and mixed precision, DeepSpeed computes the global gradient norm while clipping and then drops
    it. Keep it, so that grad_norm is reported in every layout (the ZeRO optimizers record theirs already)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )

    engine.clip_fp32_gradients = clip_and_record
