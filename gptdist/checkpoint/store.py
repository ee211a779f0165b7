"""Saving a checkpoint, and finding the one to resume from.

    RUN_DIR/checkpoints/
      step_00000100/
        mp_rank_*/zero_*/layer_* ...     DeepSpeed's sharded model and optimizer files (exact same-layout resume)
        model/                           the layout-free weights and Adam moments (any other layout, export)
        rng/rank00000.pt ...             every rank's RNG states
        gptdist_state.json               step, data position, config, tokenizer identity, MLflow run id, layout
        manifest.json                    written last: every file with size and SHA-256
      latest                             the newest complete checkpoint's name, moved after its manifest

A crash or kill at any moment leaves either a complete checkpoint or a folder without a manifest, which resume
reports and skips.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from gptdist.checkpoint.layout_free import merge_index, write_layout_free
from gptdist.checkpoint.manifest import (
    LATEST,
    checksum_problems,
    describe,
    list_files,
    read_manifest,
    size_problems,
    write_atomically,
    write_manifest,
)

STATE_FILE = "gptdist_state.json"
_TAG = re.compile(r"^step_(\d{8,})$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------- RNG, safely stored


def rng_state() -> Dict[str, Any]:
    """Every RNG that can affect training, as tensors and plain values (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------------ saving


@dataclass
class SaveContext:
    engine: Any
    param_names: Dict[int, str]  # id(parameter) -> canonical name
    topology: Any
    cfg: Any
    run_dir: Path
    rank: int
    world_size: int
    drills: Any = None  # gptdist.train.drills.FaultDrills, for reliability drills


def save_checkpoint(ctx: SaveContext, step: int, state: Dict[str, Any], keep: int) -> Optional[str]:
    """Collective: every rank calls it. Returns None when saved, else why it was not (nothing was written then,
    and the previous checkpoints stay as they were)."""
    import torch.distributed as dist

    root = checkpoint_root(ctx.run_dir)
    tag = tag_for(step)
    folder = root / tag
    problem = _storage_problem(root, ctx.rank)
    flag = torch.tensor([1.0 if problem else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        return problem or "another rank cannot write its part of the checkpoint"
    if ctx.rank == 0 and folder.exists():
        # Only an interrupted save can have left this folder: resume starts after the newest complete checkpoint.
        shutil.rmtree(folder)
    dist.barrier()
    ctx.engine.save_checkpoint(str(root), tag=tag, client_state={"gptdist_step": step}, save_latest=False)
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank{ctx.rank:05d}.pt")
    write_layout_free(ctx.engine, ctx.param_names, ctx.topology, ctx.cfg, folder / "model")
    if ctx.drills is not None:
        ctx.drills.kill_if_due("kill-during-save", step)
    dist.barrier()
    if ctx.rank == 0:
        merge_index(folder / "model", ctx.topology.layout.tp, ctx.topology.layout.pp)
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    dist.barrier()
    _write_manifest_together(ctx, folder, step)
    if ctx.rank == 0:
        write_atomically(root / LATEST, tag + "\n")
        prune(root, keep)
    dist.barrier()
    return None


def _storage_problem(root: Path, rank: int) -> Optional[str]:
    """Can this rank write a checkpoint as large as the newest complete one? Asked before writing anything, so
    a full disk or a read-only run directory costs this checkpoint, never the previous ones."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{rank}"
        probe.write_bytes(b"gptdist")
        probe.unlink()
    except OSError as exc:
        return f"{root} is not writable ({exc.strerror or exc})"
    newest = next((f for _, f in list_checkpoints(root) if read_manifest(f) is not None), None)
    if newest is None:
        return None
    needed = sum(info["size"] for info in read_manifest(newest)["files"].values())
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        return f"{free / 1e6:.1f} MB free in {root}, about {needed / 1e6:.1f} MB needed"
    return None


def _write_manifest_together(ctx: SaveContext, folder: Path, step: int) -> None:
    import torch.distributed as dist

    files: List[Optional[List[str]]] = [list_files(folder) if ctx.rank == 0 else None]
    dist.broadcast_object_list(files, src=0)
    names = files[0][ctx.rank :: ctx.world_size]
    mine = describe(folder, names)
    gathered: List[Optional[Dict]] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    if ctx.rank == 0:
        merged: Dict[str, Dict] = {}
        for part in gathered:
            merged.update(part)
        write_manifest(folder, dict(sorted(merged.items())), step)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and interrupted saves older than those."""
    found = list_checkpoints(root)
    complete = [(s, f) for s, f in found if read_manifest(f) is not None]
    kept = {f for _, f in complete[:keep]}
    oldest_kept = min((s for s, f in complete[:keep]), default=None)
    for step, folder in found:
        if folder in kept:
            continue
        older = oldest_kept is not None and step < oldest_kept
        if older or read_manifest(folder) is not None:
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ finding


def list_checkpoints(root: Path) -> List[tuple]:
    """(step, folder) of every step_* folder, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


def read_state(folder: Path) -> Dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def resume_candidates(root: Path, report: Callable[[str], None]) -> List[Path]:
    """Complete-looking checkpoints, newest first. Interrupted or truncated ones are reported and left out;
    checksums are verified later by all ranks together (verify_checksums)."""
    out = []
    for _, folder in list_checkpoints(root):
        manifest = read_manifest(folder)
        if manifest is None:
            report(f"checkpoint {folder} is incomplete (no manifest: its save was interrupted); skipping it")
            continue
        problems = size_problems(folder, manifest)
        if problems:
            report(f"checkpoint {folder} is damaged ({problems[0]}); skipping it")
            continue
        out.append(folder)
    return out


def verify_checksums(folder: Path, rank: int, world_size: int) -> List[str]:
    """Collective: every rank checks every world_size-th file; returns all problems found, on every rank."""
    import torch.distributed as dist

    manifest = read_manifest(folder)
    names = sorted(manifest["files"])[rank::world_size]
    mine = checksum_problems(folder, manifest, names)
    gathered: List[Optional[List[str]]] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return [p for part in gathered for p in part]
