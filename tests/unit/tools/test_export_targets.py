"""`gptdist export RUN --hf DIR --force` empties DIR: never a folder that holds the checkpoint being exported (or is
inside it), nor the working directory, $HOME or the root. Each is refused with one line, and nothing is removed."""

from __future__ import annotations

import os

import pytest

from tests.conftest import snapshot_tree
from tests.tools_helpers import run_cli, user_error

pytest.importorskip("transformers")


@pytest.mark.parametrize("target,words", [
    ("run", ["holds the checkpoint"]),
    ("parent", ["holds the checkpoint"]),
    ("step", ["holds the checkpoint"]),
    ("inside", ["inside the checkpoint"]),
    ("cwd", ["the working directory"]),
    ("home", ["$HOME"]),
    ("root", ["--hf / "]),  # it holds the checkpoint too
])
def test_force_refuses_unsafe_targets(target, words, imported, tmp_path, monkeypatch, capsys):
    step = sorted((imported / "checkpoints").glob("step_*"))[-1]
    home = tmp_path / "home"
    work = tmp_path / "work"
    for folder in (home, work):
        folder.mkdir()
        (folder / "keep.txt").write_text("mine\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out = {"run": imported, "parent": imported.parent, "step": step, "inside": step / "model" / "hf",
           "cwd": ".", "home": home, "root": "/"}[target]
    before = snapshot_tree(imported.parent), snapshot_tree(home), snapshot_tree(work)
    line = user_error(capsys, "export", imported, "--hf", out, "--force")
    for word in words:
        assert word in line, line
    assert (snapshot_tree(imported.parent), snapshot_tree(home), snapshot_tree(work)) == before


def test_force_still_replaces_an_ordinary_folder(imported, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old\n")
    code, _, err = run_cli(capsys, "export", imported, "--hf", out, "--force")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert os.path.isfile(out / "config.json")
