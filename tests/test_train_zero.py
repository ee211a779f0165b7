"""ZeRO data parallelism under the real deepspeed launcher trains the same model as one rank.

Each launch costs tens of seconds of start-up, so one run per layout is shared by all assertions about it.
"""

import json

import pytest

from gptdist.train.compare import compare, load_losses
from gptdist.train.metrics import read_metrics
from tests.helpers import assert_ok, launch, train_single, write_recipe

pytestmark = pytest.mark.slow
STEPS = 10


@pytest.fixture(scope="module")
def single_rank_run(tmp_path_factory, corpus, tokenizer_path):
    tmp = tmp_path_factory.mktemp("single")
    recipe = write_recipe(tmp / "r.yaml", corpus, tokenizer_path, tmp / "run", train={"steps": STEPS})
    assert_ok(train_single(recipe))
    return tmp / "run"


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_match_one_rank(zero_stage, single_rank_run, tmp_path, corpus, tokenizer_path):
    tracking = {"enabled": zero_stage == 1}  # one MLflow run checked below; the others skip its start-up cost
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, tmp_path / "run",
                          train={"steps": STEPS}, parallel={"zero_stage": zero_stage}, tracking=tracking)
    proc = launch(recipe, ranks=2)
    assert_ok(proc)
    run = tmp_path / "run"
    rows, ok = compare(load_losses(single_rank_run), load_losses(run), rtol=1e-4)
    assert len(rows) == STEPS and ok, rows
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"):
        assert all(r[key] is not None for r in records), key
    assert records[-1]["tokens"] == STEPS * 8 * 32
    # A sharded DeepSpeed checkpoint at the end, with the model states of this ZeRO stage.
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert list((ckpt / f"step_{STEPS:08d}").glob("*model_states.pt"))
    assert len(list((ckpt / f"step_{STEPS:08d}").glob("*optim_states.pt"))) == (2 if zero_stage else 1)
    assert json.loads((run / "run_complete.json").read_text())["steps"] == STEPS
    # Rank 0 alone reports progress: no other rank's start-up chatter reaches the log.
    assert "[Rank 1]" not in proc.stderr and "[rank1]" not in proc.stderr.lower()
    if tracking["enabled"]:
        _check_mlflow(run, records)


def _check_mlflow(run, records):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    complete = json.loads((run / "run_complete.json").read_text())
    mlrun = client.get_run(complete["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.steps"] == str(STEPS)
    assert mlrun.data.params["parallel.zero_stage"] == "1"
    assert mlrun.data.params["model.d_model"] == "64"
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    by_step = {m.step: m.value for m in history}
    for record in records:
        assert by_step[record["step"]] == pytest.approx(record["loss"], rel=1e-12)
    artifacts = [a.path for a in client.list_artifacts(mlrun.info.run_id)]
    assert "config.yaml" in artifacts
