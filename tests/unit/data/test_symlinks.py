"""Symbolic links in data folders are followed the same way by a folder source and by a `**` glob, each real file
once (a link loop or a second name for the same file adds nothing), and `gptdist check` shows each source's count."""

import os

import pytest

from gptdist.cli import main
from gptdist.data.config import DataConfig
from gptdist.data.sources import resolve_sources


@pytest.fixture
def linked(tmp_path):
    root = tmp_path / "data"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.txt").write_text("one\n\ntwo\n")
    (root / "real" / "b.txt").write_text("three\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.txt").write_text("four\n")
    os.symlink(outside, root / "linked-folder")  # a symlinked sub-folder: followed
    os.symlink(root, root / "real" / "loop")  # a loop back to the top: entered once
    os.symlink(root / "real" / "a.txt", root / "alias.txt")  # a second name for a.txt: counted once
    return root


def _count(spec: str) -> int:
    cfg = DataConfig(sources=[spec], tokenizer="gpt2")
    return len(resolve_sources(cfg)[0].files)


def test_folder_and_glob_agree_and_count_each_real_file_once(linked):
    assert _count(str(linked)) == 3
    assert _count(f"{linked}/**/*.txt") == 3


def test_check_shows_each_source_s_file_count(linked, tmp_path, corpus, tokenizer_path, capsys):
    from tests.helpers import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, tmp_path / "run")
    assert main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"data.sources[0].path='{corpus}': 3 file(s)" in out, out
