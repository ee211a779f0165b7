"""No secret written down: credentials planted in tracking.uri (user:password@ in the recipe, token@ on the command
line) and in $MLFLOW_TRACKING_URI reach the MLflow server only as the variables its client sends them from; no file
of the run directory, of the server's store, and no line of the captured logs holds them, and the run is tracked all
the same."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import assert_ok, launch, write_recipe

PASSWORD, TOKEN, USER = "s3cretPW-93c1", "ghpTOKEN-5d2a", "alice-7f0e"


def _holders(folder: Path, secrets) -> list:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_credentials_in_tracking_uri_are_written_nowhere(mlflow_server, tmp_path, tmp_path_factory, corpus,
                                                         tokenizer_path):
    from mlflow.tracking import MlflowClient

    host = mlflow_server.split("://", 1)[1]
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, run, train={"steps": 2},
                          tracking={"enabled": True, "uri": f"http://{USER}:{PASSWORD}@{host}",
                                    "system_metrics": False},
                          checkpoint={"every": 1})
    first = launch(recipe, ranks=1)
    assert_ok(first)
    # Resumed with the token form typed on the command line (launch/train.sh lifts it before the deepspeed launcher
    # logs its command) and a token in $MLFLOW_TRACKING_URI: the run continues in the same MLflow run.
    second = launch(recipe, ["train.steps=3", f"tracking.uri=http://{TOKEN}@{host}"], ranks=1,
                    env={"MLFLOW_TRACKING_URI": f"http://{TOKEN}@{host}"})
    assert_ok(second)

    secrets = (PASSWORD, TOKEN, USER)
    logs = "".join(p.stdout + p.stderr for p in (first, second))
    assert not [s for s in secrets if s in logs], logs[-3000:]
    assert _holders(run, secrets) == []
    stores = [p for p in tmp_path_factory.getbasetemp().glob("mlflow-server*") if p.is_dir()]
    assert stores and all(_holders(store, secrets) == [] for store in stores)

    run_id = json.loads((run / "run_complete.json").read_text())["mlflow_run_id"]
    tracked = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    assert tracked.data.params["tracking.uri"] == mlflow_server
    assert tracked.data.params["data.tokenizer"] == str(tokenizer_path)  # ordinary fields are not masked
    text = json.dumps({"params": tracked.data.params, "tags": tracked.data.tags})
    assert not [s for s in secrets if s in text]
    history = MlflowClient(tracking_uri=mlflow_server).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
