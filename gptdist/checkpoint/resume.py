"""Which checkpoint a run resumes from, whether it may, and how its state goes back into a new engine.

`resume=auto` (the default) continues from the newest complete checkpoint of run.dir, or starts fresh when there
is none; `resume=never` refuses a run directory that already holds checkpoints; `resume=PATH` names a run
directory, its checkpoints folder, or one checkpoint. Whether a checkpoint fits the config is decided before any
process group exists; its checksums are verified by all ranks together once they do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from gptdist.checkpoint.layout_free import MOMENTS, LayoutFreeReader
from gptdist.checkpoint.locate import named_candidates
from gptdist.checkpoint.store import checkpoint_root, list_checkpoints, read_state, resume_candidates, set_rng_state
from gptdist.engine.optim import base_optimizer, follow_config
from gptdist.errors import UserError

LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage")


def plan_resume(cfg, tokenizer_identity: str, report: Callable[[str], None]) -> List[Path]:
    """Candidate checkpoints, newest first (empty: start fresh). Raises UserError for what cannot be resumed."""
    spec = cfg.resume or "auto"
    run_dir = Path(cfg.run.dir)
    if spec == "never":
        if list_checkpoints(checkpoint_root(run_dir)):
            raise UserError(f"resume=never but run.dir={run_dir} already holds checkpoints: pass resume=auto to "
                            "continue that run, or choose another run.dir")
        return []
    if spec == "auto":
        candidates = resume_candidates(checkpoint_root(run_dir), report)
    else:
        candidates = named_candidates(Path(spec), report, key="resume=")
    for folder in candidates:
        check_compatible(cfg, read_state(folder), tokenizer_identity, folder)
    return candidates


def check_compatible(cfg, state: Dict[str, Any], tokenizer_identity: str, folder: Path) -> None:
    saved_model = state["config"]["model"]
    current = cfg.model.model_dump(mode="json")
    for key in current:
        if key == "dropout":
            continue  # regularization may change between phases of training; shapes may not
        if saved_model.get(key) != current[key]:
            raise UserError(
                f"resume: checkpoint {folder} was trained with model.{key}={saved_model.get(key)!r}, the config "
                f"says {current[key]!r}; a checkpoint resumes only the same model (use another run.dir to start anew)"
            )
    saved_tok = state.get("tokenizer")
    if saved_tok and saved_tok != tokenizer_identity:
        raise UserError(
            f"resume: checkpoint {folder} was trained with another tokenizer (identity {saved_tok[:12]}..., the "
            f"config's data.tokenizer={cfg.data.tokenizer} is {tokenizer_identity[:12]}...); use the same tokenizer"
        )


def same_layout(state: Dict[str, Any], layout) -> bool:
    saved = state.get("layout")
    return bool(saved) and all(saved.get(k) == getattr(layout, k) for k in LAYOUT_KEYS)


def restore_same_layout(engine, folder: Path, rank: int, train_cfg) -> None:
    """DeepSpeed's own sharded files, exactly as this layout wrote them.

    DeepSpeed's loader unpickles its files (weights_only=False: they hold its config and the optimizer's state
    structure as Python objects); gptdist only resumes files its own ranks wrote into this run's directory, and
    its own files (RNG below, layout-free tensors) load without unpickling code."""
    load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"resume: DeepSpeed found no model files for this rank in {folder}")
    follow_config(base_optimizer(engine), engine.lr_scheduler, train_cfg)
    rng = folder / "rng" / f"rank{rank:05d}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))


def restore_moments(engine, param_names: Dict[int, str], reader: LayoutFreeReader, topology, step: int) -> None:
    """Another layout: the weights went into the model before DeepSpeed wrapped it; here the Adam moments, the
    optimizer step count and the learning-rate schedule follow."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = engine.zero_optimization_stage() > 0
    tp = topology.layout.tp
    _create_adam_state(engine)
    for param in engine.module.parameters():
        name = param_names[id(param)]
        for key in MOMENTS:
            if not reader.has(key, name):
                continue
            value = reader.piece(name, param, topology.tp_rank, tp, key)
            if zero or hasattr(param, "_hp_mapping"):
                safe_set_full_optimizer_state(param, value, key)
            else:
                state = engine.optimizer.state[param]
                if not state:
                    state.update(step=_step_tensor(engine.optimizer, param), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))
                state[key].copy_(value.view_as(param))
    base = engine.optimizer.optimizer if zero else engine.optimizer
    for state in base.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step
    scheduler = engine.lr_scheduler
    if scheduler is not None and step > 0:
        scheduler.last_epoch = step - 1
        scheduler.step()  # sets every group's lr for `step`


def _step_tensor(optimizer, param: torch.Tensor) -> torch.Tensor:
    # torch's AdamW keeps `step` as a float32 scalar, on the parameter's device only for fused/capturable kernels.
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")


def _create_adam_state(engine) -> None:
    """ZeRO-1/2 and DeepSpeed's bf16 optimizer create Adam's state on the first step and only then link each
    parameter to its slice of it; a resume must write the moments before that step. Create the state (zeros) and
    link it now; the next step continues from the values written into it. ZeRO-3 reads its state directly."""
    opt = engine.optimizer
    flats = (getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
             or getattr(opt, "fp32_groups_flat_partition", None)  # bf16 optimizer
             or getattr(opt, "fp32_partitioned_groups_flat", None))  # ZeRO-3
    if flats is None:
        return
    for flat in flats:
        state = opt.optimizer.state[flat]
        if not state:
            state.update(step=_step_tensor(opt.optimizer, flat), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()
