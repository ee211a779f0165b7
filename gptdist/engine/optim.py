"""AdamW with decoupled weight decay on matrices only, and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from gptdist.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Decay weight matrices and embeddings; never biases or LayerNorm gains (as GPT-2/nanoGPT do)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A ZeRO-3 parameter holds only its partition (a flat tensor); its real shape is ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (decay if ndim >= 2 else no_decay).append(param)
    # "decay" names the group, so a resume can set its weight decay from the new config (checkpoint/resume.py).
    groups = [{"params": decay, "weight_decay": weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, train: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    # torch's AdamW rather than DeepSpeed's FusedAdam: the latter costs a build on first use and ~2 s per process
    # to load on CPU; torch's fused CUDA kernel is as fast on GPU.
    extra = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay), lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps, **extra
    )


class LRSchedule:
    """lr(step) for optimizer step `step` (0-based): linear warm-up, then cosine/linear decay to min_lr, or constant.

    A plain callable object so that LambdaLR's state_dict (and so a checkpoint) can carry it.
    """

    def __init__(self, train: TrainConfig):
        self.peak, self.floor = train.lr, train.min_lr
        self.warmup, self.total, self.decay = train.warmup_steps, train.steps, train.decay

    def lr(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.peak
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (self.peak - self.floor) * shape

    def __call__(self, step: int) -> float:
        # LambdaLR multiplies the optimizer's base lr (= peak) by this factor.
        return self.lr(step) / self.peak


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(train))


def follow_config(optimizer: torch.optim.Optimizer, scheduler, train: TrainConfig) -> None:
    """After a checkpoint's optimizer and schedule were loaded: the hyperparameters and the schedule of *this*
    config, at the step the checkpoint reached. Loading restores the saved param groups (lr, betas, eps, weight
    decay) and LambdaLR even copies the saved schedule's fields into the new schedule object; a run extended to more
    steps, or given another lr, must not keep the old ones. With an unchanged config every value is what loading
    gave, computed the same way, so the resume stays bitwise."""
    for group in optimizer.param_groups:
        group["betas"] = (train.beta1, train.beta2)
        group["eps"] = train.eps
        if "decay" in group:
            group["weight_decay"] = train.weight_decay if group["decay"] else 0.0
        group["initial_lr"] = train.lr
    if scheduler is None:
        return
    scheduler.lr_lambdas = [LRSchedule(train) for _ in optimizer.param_groups]
    scheduler.base_lrs = [train.lr for _ in optimizer.param_groups]
    # What LambdaLR.get_lr computes for the step it stands at.
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def base_optimizer(engine) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer that does the update, below DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = getattr(engine, "optimizer", None)
    seen = set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, torch.optim.Optimizer) and not isinstance(inner, torch.optim.Optimizer):
            return opt
        if inner is None:
            return opt if isinstance(opt, torch.optim.Optimizer) else None
        opt = inner
    return None
