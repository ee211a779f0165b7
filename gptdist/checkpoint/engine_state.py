"""The engine's counters in a checkpoint: what besides tensors a resume must restore to continue exactly.

    adam_step             Adam's step count (bias correction); it lags the optimizer step when steps were skipped
    scheduler_last_epoch  where the learning-rate schedule stands (it holds still on skipped steps too)
    global_steps, global_samples, skipped_steps, micro_steps   DeepSpeed's own counts
    loss_scale            fp16's dynamic loss scaler, where there is one

All plain numbers, kept in gptdist_state.json. A resume sets them, then the schedule and hyperparameters of the
config it is given at that point (engine/optim.follow_config), so a longer run or another lr takes effect at once.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from gptdist.engine.optim import base_optimizer, follow_config

_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _scaler(engine):
    """fp16's dynamic loss scaler: ZeRO's `loss_scaler`, or the unfused optimizer's `loss_scale_config`."""
    return getattr(engine.optimizer, "loss_scaler", None) or getattr(engine.optimizer, "loss_scale_config", None)


def capture(engine) -> Dict[str, Any]:
    base = base_optimizer(engine)
    steps = [s["step"] for s in base.state.values() if "step" in s] if base is not None else []
    adam_step = float(steps[0]) if steps else 0.0
    scheduler = engine.lr_scheduler
    out: Dict[str, Any] = {
        "adam_step": adam_step,
        "scheduler_last_epoch": int(scheduler.last_epoch) if scheduler is not None else None,
        "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps), "micro_steps": int(engine.micro_steps),
    }
    scaler = _scaler(engine)
    if scaler is not None and getattr(engine, "fp16_enabled", lambda: False)():
        out["loss_scale"] = {k: float(getattr(scaler, k)) for k in _SCALER if getattr(scaler, k, None) is not None}
    return out


def restore(engine, saved: Optional[Dict[str, Any]], step: int, train_cfg) -> None:
    """Counters from a checkpoint (`saved`), or, for one that has none (an imported model), those of a run that
    reached `step` without skipping any."""
    saved = saved or {"adam_step": 0.0 if step == 0 else float(step), "scheduler_last_epoch": step,
                      "global_steps": step, "global_samples": None, "skipped_steps": 0, "micro_steps": None}
    base = base_optimizer(engine)
    for state in base.state.values():
        if "step" in state:
            value = float(saved["adam_step"])
            state["step"] = torch.full_like(state["step"], value) if torch.is_tensor(state["step"]) else value
    engine.global_steps = int(saved["global_steps"])
    engine.skipped_steps = int(saved["skipped_steps"])
    gas = engine.gradient_accumulation_steps()
    engine.global_samples = int(saved["global_samples"] if saved["global_samples"] is not None
                                else step * engine.train_batch_size())
    engine.micro_steps = int(saved["micro_steps"] if saved["micro_steps"] is not None else step * gas)
    scheduler = engine.lr_scheduler
    if scheduler is not None and saved.get("scheduler_last_epoch") is not None:
        scheduler.last_epoch = int(saved["scheduler_last_epoch"])
    scaler = _scaler(engine)
    for key, value in (saved.get("loss_scale") or {}).items():
        if scaler is not None and key in _SCALER:
            setattr(scaler, key, int(value) if key != "cur_scale" else value)
    follow_config(base, scheduler, train_cfg)
