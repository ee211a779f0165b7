"""A resume follows the config it is given: the schedule, the optimizer's hyperparameters, and a log of what
changed. Here on the optimizer and schedule objects themselves; tests/launch/train/test_run_lifecycle.py resumes
real runs."""

from __future__ import annotations

import torch

from gptdist.config import TrainConfig, config_changes
from gptdist.engine.optim import build_optimizer, build_scheduler, follow_config


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def _run(train: TrainConfig, steps: int, start=None):
    model = _model()
    opt = build_optimizer(model, train, "cpu")
    sched = build_scheduler(opt, train)
    if start is not None:
        opt.load_state_dict(start[0])
        sched.load_state_dict(start[1])
        follow_config(opt, sched, train)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return lrs, (opt.state_dict(), sched.state_dict()), opt


def test_extended_run_follows_the_new_schedule_and_hyperparameters():
    short = TrainConfig(steps=10, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    long = short.model_copy(update={"steps": 20, "weight_decay": 0.05, "beta2": 0.99})
    _, saved, _ = _run(short, 10)
    resumed, _, opt = _run(long, 10, start=saved)
    fresh, _, _ = _run(long, 20)
    assert resumed == fresh[10:]
    decay = next(g for g in opt.param_groups if g["decay"])
    plain = next(g for g in opt.param_groups if not g["decay"])
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.99)


def test_unchanged_config_resumes_bitwise():
    train = TrainConfig(steps=20, warmup_steps=3)
    _, saved, _ = _run(train, 10)
    resumed, _, _ = _run(train, 10, start=saved)
    whole, _, _ = _run(train, 20)
    assert resumed == whole[10:]


def test_config_changes_name_each_key():
    assert config_changes({"train": {"steps": 10, "lr": 1.0}, "run": {"dir": "a"}},
                          {"train": {"steps": 20, "lr": 1.0}, "run": {"dir": "a"}}) == ["train.steps: 10 -> 20"]
