"""Which checkpoint a run resumes from, and whether it may: decided before any process group exists.

    resume=auto    the run directory's newest complete checkpoint, or a fresh start when it has none
    resume=never   a fresh start; a run directory that already holds checkpoints is refused
    resume=PATH    PATH (a run directory, its checkpoints folder, or one checkpoint) seeds this run directory, but
                   only while it has no complete checkpoint of its own: once it has, the run continues from its own
                   newest, so the same command run again (a Slurm requeue passes the same arguments) continues
                   instead of starting again from PATH

A checkpoint fits when it was trained with the same model shape, tokenizer, data section and seed; its checksums
are verified by all ranks together once the process group exists (checkpoint/checkpointer.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

from gptdist.checkpoint.locate import named_candidates
from gptdist.checkpoint.store import checkpoint_root, list_checkpoints, read_state, resume_candidates
from gptdist.errors import UserError

LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage")


def plan_resume(cfg, tokenizer_identity: str, report: Callable[[str], None]) -> List[Path]:
    """Candidate checkpoints, newest first (empty: start fresh). Raises UserError for what cannot be resumed."""
    spec = cfg.resume or "auto"
    root = checkpoint_root(Path(cfg.run.dir))
    if spec == "never":
        if list_checkpoints(root):
            raise UserError(f"resume=never but run.dir={cfg.run.dir} already holds checkpoints: pass resume=auto to "
                            "continue that run, or choose another run.dir")
        return []
    own = resume_candidates(root, report)
    if spec == "auto":
        candidates = own
    elif own:
        report(f"resume={spec}: run.dir={cfg.run.dir} already holds its own checkpoints (newest {own[0].name}); the "
               "run continues from those (resume=PATH only seeds a run directory that has none)")
        candidates = own
    else:
        candidates = named_candidates(Path(spec), report, key="resume=")
    plans: List[Any] = []  # the data plan, made once and only when there is a checkpoint to check
    for folder in candidates:
        state = read_state(folder)
        check_compatible(cfg, state, tokenizer_identity, folder)
        check_data_position(cfg, state, plans)
    return candidates


def check_data_position(cfg, state: Dict[str, Any], plans: List[Any]) -> None:
    """The checkpoint's data position against this config (seq_len, seed, the data section): the same check, and the
    same line, as the data feed makes when it starts from it (data/packing.py), made here before any process group."""
    # torch: the data feed's modules load only when a checkpoint is resumed; `gptdist check` of a new run skips them
    from gptdist.data.loader import make_plan
    from gptdist.data.packing import parse_state

    if not plans:
        plans.append(make_plan(cfg.data, cfg.train.seed)[0])
    parse_state(state.get("data_state"), plans[0], cfg.model.seq_len)


def check_compatible(cfg, state: Dict[str, Any], tokenizer_identity: str, folder: Path) -> None:
    saved = state.get("config") or {}
    saved_model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    current = cfg.model.model_dump(mode="json")
    for key in current:
        if key == "dropout":
            continue  # regularization may change between phases of training; shapes may not
        if saved_model.get(key) != current[key]:
            raise UserError(
                f"resume: checkpoint {folder} was trained with model.{key}={saved_model.get(key)!r}, the config "
                f"says {current[key]!r}; a checkpoint resumes only the same model (use another run.dir to start anew)"
            )
    step = state.get("step")
    if isinstance(step, int) and step > cfg.train.steps:
        raise UserError(
            f"resume: checkpoint {folder} is at step {step}, past train.steps={cfg.train.steps}; set train.steps "
            f"to {step} or more to go on from it, or use another run.dir to start anew"
        )
    saved_tok = state.get("tokenizer")
    if saved_tok and saved_tok != tokenizer_identity:
        raise UserError(
            f"resume: checkpoint {folder} was trained with another tokenizer (identity {str(saved_tok)[:12]}..., the "
            f"config's data.tokenizer={cfg.data.tokenizer} is {tokenizer_identity[:12]}...); use the same tokenizer"
        )


def same_layout(state: Dict[str, Any], layout) -> bool:
    saved = state.get("layout")
    return isinstance(saved, dict) and all(saved.get(k) == getattr(layout, k) for k in LAYOUT_KEYS)
