"""An earlier attempt's records (run_complete.json, stopped.json, not_saved.json) are gone as soon as rank 0 holds
run.dir's lock, before the engine is built: a crash while the run starts must not read (slurm/train.sbatch) as the
earlier attempt's completion. `gptdist check` (no lock taken) leaves them."""

from gptdist.config import load_config
from gptdist.train.outcome import COMPLETE_FILE, NOT_SAVED_FILE, STOPPED_FILE
from gptdist.train.preflight import preflight
from gptdist.train.run_lock import LOCK_FILE
from tests.helpers import write_recipe

RECORDS = (COMPLETE_FILE, STOPPED_FILE, NOT_SAVED_FILE)


def test_taking_the_lock_clears_the_earlier_attempts_records(tmp_path, corpus, tokenizer_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in RECORDS:
        (run / name).write_text('{"steps": 10}\n')
    cfg = load_config(write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run))
    checked = preflight(cfg, 1, lambda m: None, probe_tracking=False)  # `gptdist check`, another rank
    assert all((run / name).exists() for name in RECORDS)
    checked = preflight(cfg, 1, lambda m: None, probe_tracking=False, take_lock=True)  # rank 0 of `gptdist train`
    try:
        assert (run / LOCK_FILE).exists() and not any((run / name).exists() for name in RECORDS)
    finally:
        checked.lock.release()
