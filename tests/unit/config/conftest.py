"""Shared by the bad-input tests: a run directory a mistake must not touch, and the driver that puts one input
through `gptdist check` and `gptdist train` (in this process, through the command line's main) and returns the one
line each printed."""

import hashlib
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from gptdist.cli import main
from tests.helpers import assert_ok, train_single, write_recipe

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GPTDIST_FAULTS")


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, corpus, tokenizer_path):
    """A run directory with two complete checkpoints (steps 1 and 2), metrics: what a mistake must not touch."""
    tmp = tmp_path_factory.mktemp("existing")
    recipe = write_recipe(tmp / "r.yaml", corpus, tokenizer_path, tmp / "run", train={"steps": 2},
                          checkpoint={"every": 1})
    assert_ok(train_single(recipe))
    return tmp / "run", recipe


@pytest.fixture(autouse=True)
def _restore_environment():
    # `gptdist train` fills in RANK/WORLD_SIZE/MASTER_* for a lone process and keeps mlflow out of a process that
    # does not track; keep tests independent of that.
    saved = dict(os.environ)
    for name in LAUNCHER_ENV:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
        del sys.modules["mlflow"]


def snapshot(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(command: str, recipe: Path, overrides: List[str], capsys, env: Optional[Dict[str, str]] = None,
            extra: List[str] = ()) -> str:
    """Runs one command; asserts exit status 2, exactly one line under 300 characters and no traceback; returns it."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        code = main([command, str(recipe), *overrides, *extra])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (command, err, captured.out[-2000:])
    assert "Traceback" not in err + captured.out, err
    found = [line for line in err.splitlines() if line.startswith("gptdist:")]
    assert len(found) == 1, (command, err)
    assert len(found[0]) < 300, found[0]
    return found[0]
