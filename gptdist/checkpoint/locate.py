"""From a path a user typed to the checkpoints it stands for: the one path shared by `resume=PATH` and the tools
(export, eval, generate).

    a checkpoint folder (step_*/)          itself, and it must be complete: quietly using an older checkpoint than
                                           the one named would resume or export something else than asked for
    a run directory, or its checkpoints/   its complete checkpoints, newest first (incomplete or truncated ones
                                           are reported and passed over)

Sizes are checked here (cheap); checksums by the caller, over the files it will read: all ranks together when
resuming (store.verify_checksums), the files of the layout-free weights when a tool opens one (verify_for_reading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from gptdist.checkpoint.manifest import MANIFEST, STATE_FILE, checksum_problems, read_manifest
from gptdist.checkpoint.store import damage, list_checkpoints, refuse_foreign, resume_candidates
from gptdist.errors import UserError


def looks_like_checkpoint(path: Path) -> bool:
    return any((path / name).exists() for name in (MANIFEST, STATE_FILE, "model"))


def named_candidates(path: Path, report: Callable[[str], None], key: str = "") -> List[Path]:
    """key: how the user named it, e.g. 'resume=' (empty for a tool's argument). Raises UserError when `path`
    stands for no complete checkpoint."""
    where = f"{key}{path}"
    if not path.exists():
        raise UserError(f"{where}: no such checkpoint or run directory")
    if not path.is_dir():
        raise UserError(f"{where} is a file; name a run directory, its checkpoints/ folder or one step_* checkpoint")
    if looks_like_checkpoint(path):
        problem = damage(path)
        if problem:
            raise UserError(f"{where}: the checkpoint is {problem}; name an earlier checkpoint or the run directory")
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not list_checkpoints(root):
        raise UserError(f"{where}: no complete checkpoint: not a run directory, checkpoints folder or checkpoint "
                        f"(no step_* folders in {root})")
    skipped: List[str] = []
    candidates = resume_candidates(root, skipped.append)
    if not candidates:
        raise UserError(f"{where}: no complete checkpoint in {root}; the newest: {skipped[0]}")
    for message in skipped:  # newer than the one used: say why they were passed over
        report(message)
    return candidates


def verify_for_reading(folder: Path, prefixes=("model/", STATE_FILE)) -> List[str]:
    """One process: the file set, and the checksums of the files a reader of the layout-free weights opens."""
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"no readable {MANIFEST}"]
    refuse_foreign(folder, manifest)
    names = [n for n in manifest["files"] if n.startswith(prefixes)]
    return checksum_problems(folder, manifest, names)


def first_verified(candidates: Sequence[Path], problems_of: Callable[[Path], List[str]],
                   report: Callable[[str], None], named: Optional[Path] = None) -> Path:
    """The newest candidate whose files match their checksums, saying why each newer one was passed over: the one
    fallback loop of resume and of the tools. problems_of(folder): its checksum problems (a collective when every
    rank of a job verifies its share). `named`: a checkpoint the user named itself, which must be intact (quietly
    using an older one would resume or export something else than asked for). Raises UserError when none holds."""
    problems: List[str] = []
    for folder in candidates:
        problems = problems_of(folder)
        if not problems:
            return folder
        if named is not None and folder == named or len(candidates) == 1:
            raise UserError(f"{folder}: damaged checkpoint: {problems[0]}")
        report(f"checkpoint {folder} is corrupted ({problems[0]}); falling back to the previous one")
    raise UserError(f"every complete checkpoint is corrupted (the oldest, {candidates[-1]}: {problems[0]}); "
                    "name a good checkpoint with resume=PATH, or start anew in another run.dir")

