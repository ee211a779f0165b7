"""The DeepSpeed JSON for a run, generated from the run config; a user file can extend or override it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from gptdist.config import RunConfig
from gptdist.errors import UserError
from gptdist.model.config import GPTConfig
from gptdist.parallel.layout import Layout

# DeepSpeed's comms logger, for profile.comms (telemetry/profiling.py reads what it recorded).
COMMS_LOGGER = {"comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False}}


def resolve_precision(cfg: RunConfig, device_type: str) -> str:
    wanted = cfg.train.precision
    if wanted == "auto":
        if device_type == "cuda":
            # torch: only on a GPU; `gptdist check` imports this module and stays without torch
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if wanted == "fp16" and device_type != "cuda":
        raise UserError("config error: train.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use fp32 or "
                        "bf16")
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
    if layout.zero_stage > 0:
        ds["zero_optimization"].update(zero_buffers(cfg.model, layout.tp))
    if layout.zero_stage in (1, 2):
        # Reduce each gradient bucket's slices to the rank that owns them (ZeRO's 2Ψ per step) instead of
        # DeepSpeed's default all-reduce of every bucket (3Ψ): fewer bytes at the same speed (docs/performance.md).
        ds["zero_optimization"]["use_multi_rank_bucket_allreduce"] = False
    if cfg.profile.comms:
        ds.update(COMMS_LOGGER)
    if cfg.train.deepspeed_config:
        path = cfg.train.deepspeed_config
        ds = _merge(ds, read_deepspeed_json(path, f"config error: train.deepspeed_config={path!r}"))
    return ds


def block_numel(model: GPTConfig, tp: int) -> int:
    """Parameters of one Transformer block on one tensor-parallel rank (projections split, norms replicated)."""
    d, f = model.d_model, model.ffn_dim
    matrices = 4 * d * d + 2 * d * f
    biases = (3 * d + f) if model.bias else 0  # qkv and fc1 biases are split; proj/fc2 biases replicated
    replicated = (2 * d if model.bias else 0) + (4 * d if model.bias else 2 * d)
    return (matrices + biases) // tp + replicated


def zero_buffers(model: GPTConfig, tp: int) -> Dict[str, Any]:
    """ZeRO's buffer sizes, in elements, sized for the model instead of DeepSpeed's defaults (5e8 elements per
    gradient bucket: 2 GB in fp32 allocated every backward pass, whatever the model's size; ZeRO-3 keeping up to
    1e9 gathered parameter elements alive, the whole model below a few billion parameters).

    A gradient bucket holds one block's gradients: a block's reduction is one collective, and the bucket is 1/L
    of the model. ZeRO-3 prefetches one block ahead, releases a gathered parameter unless it is used again within
    one block's worth of fetches, keeps about one block (or the largest parameter, the vocabulary table) gathered,
    and leaves parameters under 10 x d_model (norm gains, biases) unpartitioned, since gathering each of those
    costs a collective for a few kilobytes. `gptdist plan` predicts memory from the same numbers."""
    block = block_numel(model, tp)
    block += block % 2  # DeepSpeed wants the all-gather bucket a multiple of 2 elements
    largest = max(model.vocab_size * model.d_model // tp, block)
    return {
        "reduce_bucket_size": block,
        "allgather_bucket_size": block,
        "stage3_prefetch_bucket_size": block,
        "stage3_max_live_parameters": largest,
        "stage3_max_reuse_distance": block,
        "stage3_param_persistence_threshold": 10 * model.d_model,
    }


def read_deepspeed_json(path: str, source: str) -> Dict[str, Any]:
    """A user's DeepSpeed JSON (train.deepspeed_config, or accelerate's deepspeed_config_file), checked: a JSON object
    without "optimizer" or "scheduler" sections, which would contradict the AdamW and schedule gptdist builds.
    `source`: how the user named the file, for messages."""
    file = Path(path)
    source = source if len(source) <= 160 else f"{source[:150]}...'"
    try:
        found = file.is_file()
    except OSError:  # a name too long for the file system
        found = False
    if not found:
        raise UserError(f"{source}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: must hold a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in data:
            raise UserError(f"{source}: has an \"{section}\" section, but gptdist builds AdamW and its learning-rate "
                            "schedule itself (train.lr, train.min_lr, train.warmup_steps, train.beta1/beta2, "
                            "train.weight_decay); remove the section")
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
