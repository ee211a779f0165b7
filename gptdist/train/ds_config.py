"""The DeepSpeed JSON for a run, generated from the run config; a user file can extend or override it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from gptdist.config import RunConfig
from gptdist.errors import UserError
from gptdist.parallel.layout import Layout


def resolve_precision(cfg: RunConfig, device_type: str) -> str:
    wanted = cfg.train.precision
    if wanted == "auto":
        if device_type == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if wanted == "fp16" and device_type != "cuda":
        raise UserError("config error: train.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use fp32 or bf16")
    return wanted


def build_ds_config(cfg: RunConfig, layout: Layout, precision: str) -> Dict[str, Any]:
    ds: Dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": layout.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # gptdist prints its own progress; DeepSpeed's periodic prints would interleave from every rank.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if layout.zero_stage in (1, 2):
        # Reduce each gradient bucket's slices to the rank that owns them (ZeRO's 2Ψ per step) instead of
        # DeepSpeed's default all-reduce of every bucket (3Ψ): fewer bytes at the same speed (docs/performance.md).
        ds["zero_optimization"]["use_multi_rank_bucket_allreduce"] = False
    if layout.zero_stage == 3:
        # Keep small parameters partitioned too, so tiny test models exercise the real ZeRO-3 path.
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    if cfg.train.deepspeed_config:
        ds = _merge(ds, _read_user_config(cfg.train.deepspeed_config))
    return ds


def _read_user_config(path: str) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config error: train.deepspeed_config={path!r}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config error: train.deepspeed_config={path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config error: train.deepspeed_config={path!r} must hold a JSON object")
    return data


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if value == "auto":
            # accelerate's convention in DeepSpeed files, "the script fills this in": gptdist's value where it sets
            # one, else DeepSpeed's default.
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
