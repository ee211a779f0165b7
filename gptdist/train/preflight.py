"""Everything a run can be refused for, checked before any process group exists: the one function behind both
`gptdist train` (on every rank, before the ranks wait on each other) and `gptdist check` (before any launcher).

    layout and batch arithmetic (and what a pipeline needs of the model)  -> parallel/layout.py
    the DeepSpeed JSON gptdist would hand DeepSpeed, a user file merged    -> validated by DeepSpeed's own parser
    precision on this device
    data: sources, tokenizer, vocabulary; the held-out source of eval.data -> data/checks.py, data/held_out.py
    resume: which checkpoints, and whether they fit the config            -> checkpoint/resume.py
    tracking: the server can be reached (http URIs)                        -> telemetry/tracking.py
    the fault drills asked for in GPTDIST_FAULTS                           -> train/drills.py
    run.dir: no other live job holds it (rank 0 of `train` then takes it)  -> train/run_lock.py
    (rank 0 of `train`, holding it: an earlier attempt's records cleared)  -> train/outcome.py

Each refusal is a UserError: one line, exit status 2, nothing written.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from gptdist.checkpoint.manifest import LATEST
from gptdist.checkpoint.resume import plan_resume
from gptdist.checkpoint.store import checkpoint_root
from gptdist.config import RunConfig
from gptdist.data import check_data
from gptdist.data.held_out import check_source
from gptdist.engine.ds_config import build_ds_config, resolve_precision
from gptdist.errors import UserError
from gptdist.parallel.layout import Layout
from gptdist.telemetry.metrics_file import read_metrics
from gptdist.telemetry.tracking import preflight as tracking_preflight
from gptdist.train.drills import parse_drills
from gptdist.train.outcome import clear_records
from gptdist.train.run_lock import RunLock


@dataclass
class Preflight:
    layout: Layout
    tokenizer: object  # gptdist.data.tokenizer.Tokenizer
    candidates: List[Path]  # checkpoints to resume from, newest first (empty: a fresh start)
    tracking_warning: Optional[str]  # the server cannot be reached and tracking.on_unreachable=warn
    lock: RunLock  # run.dir's lock: held by rank 0 of `gptdist train`, only checked otherwise


def preflight(cfg: RunConfig, world_size: int, report: Callable[[str], None], *, probe_tracking: bool = True,
              take_lock: bool = False) -> Preflight:
    """report: where warnings about skipped (damaged or incomplete) checkpoints go. take_lock: rank 0 of a training
    run takes run.dir's lock, last, once nothing else can refuse the run."""
    layout = Layout.resolve(cfg, world_size)
    check_writable(Path(cfg.run.dir), "run.dir")
    check_checkpoint_folder(Path(cfg.run.dir))
    if cfg.data.cache != "off":
        cache = Path(cfg.run.dir) / "token_cache" if cfg.data.cache == "run" else Path(cfg.data.cache).expanduser()
        if cfg.data.cache != "run":
            check_writable(cache, "data.cache")
        for part in ("index", "blocks"):  # a shared cache: the folders another user made must be writable too
            if (cache / part).exists():
                check_writable(cache / part, "data.cache")
    check_precision(cfg)
    check_deepspeed_config(cfg, layout)
    tokenizer = check_data(cfg.data, cfg.model.vocab_size)
    if cfg.eval.source is not None:
        src = cfg.eval.source
        check_source(src, cfg.data.tokenizer, src.text_field or cfg.data.text_field, cfg.data.text_split, "eval.data")
    candidates = plan_resume(cfg, tokenizer.identity, report)
    warning = None
    if probe_tracking:
        warning = tracking_preflight(cfg.tracking, Path(cfg.run.dir))
    parse_drills(os.environ.get("GPTDIST_FAULTS", ""))
    metrics = Path(cfg.run.dir) / "metrics.jsonl"
    if metrics.is_file():
        read_metrics(metrics)  # an edited line (JSON, not a record) is refused now, not after the ranks start
    lock = RunLock(Path(cfg.run.dir))
    if take_lock:
        lock.acquire(report)
        # The records of an earlier attempt no longer describe this run: gone before anything can fail, so that a
        # crash while the run starts is not read (slurm/train.sbatch) as the earlier attempt's completion.
        clear_records(Path(cfg.run.dir))
    else:
        lock.check()
    return Preflight(layout, tokenizer, candidates, warning, lock)


def check_writable(path: Path, key: str) -> None:
    """A folder the run will write into can be: it is a folder (or can be made one) and a file can be created in it.
    Proved with a temporary file (or, where the folder does not exist yet, a temporary folder beside it), removed at
    once: the folder itself is left as it was."""
    where = f"{key}={str(path)[:120]}"
    try:
        path.exists()
    except OSError as exc:  # a name too long for the file system
        why = exc.strerror or exc
        raise UserError(f"{where} is not a usable path ({why}); choose another path for {key}") from None
    if path.exists() and not path.is_dir():
        raise UserError(f"{where} is an existing file, not a folder; choose a folder path for {key}")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{where} cannot be created: {parent} is a file, not a folder; choose another path for {key}")
    try:
        if parent == path:
            fd, probe = tempfile.mkstemp(prefix=".gptdist-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".gptdist-probe-", dir=parent))
    except OSError as exc:
        verb = "is not writable" if parent == path else f"cannot be created in {parent}"
        raise UserError(f"{where} {verb} ({exc.strerror or type(exc).__name__}); choose a folder this user may write "
                        f"for {key}") from None


def check_checkpoint_folder(run_dir: Path) -> None:
    """What a disk can leave where saves go: RUN_DIR/checkpoints a file, or its `latest` a folder, would let the run
    train and then fail every save."""
    root = checkpoint_root(run_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file where run.dir keeps its checkpoints folder; move it away or choose "
                        "another run.dir")
    latest = root / LATEST
    if latest.exists() and not latest.is_file():
        raise UserError(f"{latest} is not a file (it names the newest checkpoint); remove it, gptdist writes it at "
                        "the next save")
    if root.is_dir():
        check_writable(root, "run.dir")


def check_precision(cfg: RunConfig) -> None:
    """fp16 needs a GPU (DeepSpeed refuses it on CPU); auto, fp32 and bf16 run anywhere."""
    if cfg.train.precision != "fp16":
        return
    # torch: only for fp16; `gptdist check` starts without it
    import torch

    resolve_precision(cfg, "cuda" if torch.cuda.is_available() else "cpu")


def check_deepspeed_config(cfg: RunConfig, layout: Layout) -> None:
    """The JSON DeepSpeed will get, with the user's file merged in, parsed by DeepSpeed itself now rather than on
    every rank after the process group starts. Only a user file can make it wrong, so only then is DeepSpeed
    imported here."""
    if not cfg.train.deepspeed_config:
        return

    path = cfg.train.deepspeed_config
    ds = build_ds_config(cfg, layout, "fp32" if cfg.train.precision == "auto" else cfg.train.precision)
    batch = {"train_batch_size": layout.global_batch_size,
             "train_micro_batch_size_per_gpu": layout.micro_batch_size,
             "gradient_accumulation_steps": layout.grad_accum}
    for key, derived in batch.items():
        if key in ds and ds[key] != derived:
            raise UserError(
                f"config error: train.deepspeed_config={path!r} sets {key}={ds[key]!r} but the layout gives "
                f"{derived}; remove it from the file (gptdist derives it) or change train.micro_batch_size/"
                "train.global_batch_size"
            )
    # DeepSpeed's parser checks every other key and type; outside a process group it sees a world of one, so it
    # is given the batch arithmetic of one data-parallel rank (checked above for the real one).
    one_rank = dict(ds, train_batch_size=layout.micro_batch_size * layout.grad_accum)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # deepspeed: slow to import, only for the DeepSpeed config check
        from deepspeed.runtime.config import DeepSpeedConfig

        try:
            DeepSpeedConfig(one_rank)
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises pydantic, Value, Assertion and Key errors alike
            first = (str(exc).strip().splitlines() or [type(exc).__name__])
            detail = " ".join(line.strip() for line in first[:3])[:300]
            raise UserError(f"config error: train.deepspeed_config={path!r}: DeepSpeed refuses it: {detail}") from None
