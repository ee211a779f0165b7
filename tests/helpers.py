"""Shared by the tests: a tiny recipe on a packaged corpus, and real launches of `gptdist train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = {"n_layer": 2, "n_head": 2, "d_model": 64, "vocab_size": 512, "seq_len": 32}


def write_recipe(path: Path, corpus: Path, tokenizer: Path, run_dir: Path, **sections: Dict) -> Path:
    recipe = {
        "model": dict(TINY_MODEL),
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 0},
        "train": {"steps": 10, "micro_batch_size": 4, "global_batch_size": 8, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 2, "seed": 7, "log_every": 5},
        "data": {"sources": str(corpus), "text_split": "paragraph", "tokenizer": str(tokenizer), "shuffle_buffer": 64},
        "run": {"dir": str(run_dir)},
        "tracking": {"enabled": False},
        "checkpoint": {"every": 0},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


def cpu_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra or {})
    return env


def _run(cmd: List[str], env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def launch(recipe: Path, overrides: Sequence[str] = (), ranks: int = 2, timeout: float = 900,
           env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`launch/train.sh` with GPUS_PER_NODE ranks: the deepspeed launcher, for real."""
    env = cpu_env({"GPUS_PER_NODE": str(ranks), **(env or {})})
    return _run(["bash", "launch/train.sh", str(recipe), *overrides], env, timeout)


def launch_pair(*calls):
    """Independent launches, two at a time (a launch is mostly single-threaded start-up: two share 2 cores well).
    Each call is (recipe, overrides, ranks, env); returns the CompletedProcess of each, in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(launch, recipe, overrides, ranks, 900, env) for recipe, overrides, ranks, env in calls]
        return [f.result() for f in futures]


def train_single(recipe: Path, overrides: Sequence[str] = (), timeout: float = 600,
                 env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """One rank, started alone (no launcher): the reference every layout is compared with."""
    return _run([sys.executable, "-m", "gptdist.cli", "train", str(recipe), *overrides], cpu_env(env), timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-6000:]}")
