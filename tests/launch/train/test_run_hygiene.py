"""What an ordinary run leaves behind and waits on: nothing in /dev/shm, no wait on a build lock a killed process left,
no MFU hidden for good by a CPU peak measured under load. One 1-rank run and one 2-rank run under the launcher."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import assert_ok, launch, train_single, write_recipe

SHM = Path("/dev/shm")
OURS = ("deepspeed", "gptdist", "torch")


def _shm_files() -> set:
    return {p.name for p in SHM.iterdir() if p.name.startswith(OURS)} if SHM.is_dir() else set()


@pytest.fixture
def planted(tmp_path):
    """A stale torch build lock in the memory counter's build folder, a low CPU peak in a fresh cache, a DeepSpeed
    buffer of a killed run in /dev/shm."""
    import torch

    from gptdist.telemetry import live_bytes, peak

    _, build_dir = live_bytes._stable_source()
    # XDG_CACHE_HOME moves below; the extensions folder stays where launch/setup.sh built the counter.
    extensions = str(build_dir.parent)
    lock = build_dir / "lock"
    lock.write_text("")
    cache = tmp_path / "cache"
    (cache / "gptdist").mkdir(parents=True)
    torch.set_num_threads(1)  # the run's threads (OMP_NUM_THREADS=1): the same cache key
    key = peak.cache_key(1, 1)
    (cache / "gptdist" / "cpu_peak.json").write_text(json.dumps({key: 1e6}))  # 1 MFLOP/s: "measured under load"
    stale = SHM / "deepspeed_allreduce_buffer_killedrun_1_0"
    if SHM.is_dir():
        stale.write_bytes(b"\0" * 4096)
    yield {"lock": lock, "cache": cache, "key": key, "stale": stale,
           "env": {"XDG_CACHE_HOME": str(cache), "TORCH_EXTENSIONS_DIR": extensions}}
    lock.unlink(missing_ok=True)
    stale.unlink(missing_ok=True)


def test_runs_leave_nothing_behind_and_wait_on_nothing_stale(tmp_path, corpus, tokenizer_path, planted):
    before = _shm_files() - {planted["stale"].name}
    recipe = write_recipe(tmp_path / "one.yaml", corpus, tokenizer_path, tmp_path / "one",
                          train={"steps": 20, "global_batch_size": 4, "log_every": 5},
                          profile={"memory": True})
    started = time.monotonic()
    proc = train_single(recipe, env=planted["env"])
    assert_ok(proc)
    assert time.monotonic() - started < 300
    # The stale lock: removed, said so, and the memory report counted live bytes (the counter loaded).
    assert not planted["lock"].exists(), proc.stderr[-3000:]
    assert "a build lock left by a process killed while building" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "one" / "memory" / "rank_0.json").read_text())
    assert report["peak_live_bytes"] > 0 and report["live_bytes_counted_until_step"] == 2
    # The peak measured under load did not hide MFU: this run measured the machine again and kept the best.
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if "mfu" in r and r["step"] > 5]
    assert mfus and all(m is not None and 0 < m <= 1 for m in mfus), mfus
    cached = json.loads((planted["cache"] / "gptdist" / "cpu_peak.json").read_text())[planted["key"]]
    assert cached > 1e9
    # /dev/shm: the killed run's buffer is gone, and this run made none.
    assert not planted["stale"].exists()
    assert _shm_files() - before == set()
    # The step-time breakdown of the run.
    times = json.loads((tmp_path / "one" / "step_times.json").read_text())
    assert times["steps"] == 10 and times["ms_per_step"]["model"] > 0

    # Two ranks under the deepspeed launcher: nothing in /dev/shm either, finished or stopped.
    recipe2 = write_recipe(tmp_path / "two.yaml", corpus, tokenizer_path, tmp_path / "two", train={"steps": 4})
    assert_ok(launch(recipe2, ranks=2, env=planted["env"]))
    assert (tmp_path / "two" / "run_complete.json").exists()
    assert _shm_files() - before == set(), os.listdir(SHM)
