"""What resume trusts, tried as an attacker would: a pickle planted under any name DeepSpeed or gptdist ever read, an
unlisted file, a crafted tensor header. Each is refused by `gptdist check` and `gptdist train` with exit 2 and one
line, and the pickle never runs (the canary it would create does not exist afterwards)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptdist.checkpoint.manifest import describe, list_files, write_manifest
from gptdist.checkpoint.safetensors_io import SafetensorsFile
from tests.helpers import ROOT, assert_ok, cpu_env, train_single, write_recipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus, tokenizer_path):
    tmp = tmp_path_factory.mktemp("trust")
    recipe = write_recipe(tmp / "r.yaml", corpus, tokenizer_path, tmp / "run", train={"steps": 2})
    assert_ok(train_single(recipe))
    return recipe, tmp / "run" / "checkpoints" / "step_00000002"


class _Canary:
    """Unpickling it creates a file: the proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _reseal(folder: Path) -> None:
    """What an attacker who can write the folder can do too: a manifest that lists the planted file."""
    write_manifest(folder, describe(folder, list_files(folder)), 2)


PLANTS = [  # (file name, re-seal the manifest so that it lists the plant)
    ("mp_rank_00_model_states.pt", False),  # DeepSpeed's model states, the first file its loader globbed
    ("mp_rank_-1_model_states.pt", True),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", False),
    ("layer_01-model_states.pt", True),  # the pipeline's per-layer files
    ("rng/rank00000.pt", False),  # where gptdist kept RNG states (read with torch.load)
    ("model/rank00000.safetensors", True),  # gptdist's own names, replaced by a pickle
    ("rng/rank00000.safetensors", True),
    ("model/index.json", True),
    ("gptdist_state.json", True),
]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptdist.cli", *argv], cwd=ROOT, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name,reseal", PLANTS, ids=[n for n, _ in PLANTS])
def test_a_planted_pickle_is_refused_and_never_runs(saved, tmp_path, name, reseal):
    recipe, checkpoint = saved
    canary = tmp_path / "canary"
    folder = tmp_path / "copy" / "step_00000002"
    shutil.copytree(checkpoint, folder)
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pickle.dumps(_Canary(canary)))
    if reseal:
        _reseal(folder)
    lines = []
    for command in ("check", "train"):
        proc = _run(command, str(recipe), f"resume={folder}", f"run.dir={tmp_path / 'run'}")
        assert proc.returncode == 2, (command, proc.stderr[-3000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("gptdist:")]
        assert len(errors) == 1 and len(errors[0]) < 300, (command, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert name in lines[0] or "damaged" in lines[0] or "not a valid safetensors" in lines[0], lines[0]
    assert not canary.exists(), "the planted pickle ran"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unlisted_file_is_refused_in_one_line(saved, tmp_path):
    recipe, checkpoint = saved
    folder = tmp_path / "copy" / "step_00000002"
    shutil.copytree(checkpoint, folder)
    (folder / "model" / "notes.txt").write_text("a note someone left")
    proc = _run("train", str(recipe), f"resume={folder}", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("gptdist:")]
    assert len(line) == 1 and "model/notes.txt is not listed in its manifest" in line[0], proc.stderr[-2000:]


def test_no_file_of_a_checkpoint_is_a_pickle(saved):
    _, checkpoint = saved
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    assert sorted(str(p.relative_to(checkpoint)) for p in files) == [
        "gptdist_state.json", "manifest.json", "model/index.json", "model/rank00000.safetensors",
        "rng/rank00000.safetensors"]
    for path in files:  # each one read as what its name says, by readers that never unpickle
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            SafetensorsFile(path)
