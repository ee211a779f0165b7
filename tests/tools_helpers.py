"""Shared by the tools' tests: the command line run in this process, and checkpoints read independently of
gptdist.tools."""

from __future__ import annotations

import json
from pathlib import Path

from gptdist.checkpoint.layout_free import LayoutFreeReader
from gptdist.checkpoint.manifest import describe, list_files, write_manifest
from gptdist.cli import main
from gptdist.model import GPT

STEP0 = "step_00000000"


def run_cli(capsys, *argv: str):
    """(exit status, stdout, stderr) of `gptdist ARGV` run in this process (no interpreter start-up)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptdist: "), err
    return lines[0]


def model_of(checkpoint: Path) -> GPT:
    """gptdist's plain GPT from a checkpoint's layout-free form, independently of gptdist.tools."""
    from gptdist.checkpoint.store import read_state
    from gptdist.config import RunConfig

    cfg = RunConfig.model_validate(read_state(checkpoint)["config"])
    model = GPT(cfg.model, seed=None)
    model.load_state_dict(LayoutFreeReader(checkpoint / "model").state_dict())
    return model.eval()


def rewrite_state(folder: Path, edit) -> None:
    """Edit gptdist_state.json and re-seal the checkpoint (a new manifest), as a run with that config would."""
    state = json.loads((folder / "gptdist_state.json").read_text())
    edit(state)
    (folder / "gptdist_state.json").write_text(json.dumps(state))
    write_manifest(folder, describe(folder, list_files(folder)), state["step"])
