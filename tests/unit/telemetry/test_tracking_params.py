"""What goes to MLflow as params: the flattened config, never a credential."""

import os

import pytest

from gptdist.config import dump_config, lift_credentials, load_config, split_credentials
from gptdist.telemetry.tracking import flatten, mask_secrets


def test_config_flattens_to_dotted_params():
    params = flatten(load_config(None, ["train.steps=7"]).to_dict())
    assert params["train.steps"] == 7 and params["model.n_layer"] == 12 and "parallel.zero_stage" in params


def test_secrets_are_masked():
    masked = mask_secrets({
        "tracking.uri": "https://alice:hunter2@mlflow.example/",
        "data.hf_token": "hf_abcdef",
        "extra.api_key": "sk-123",
        "extra.password": "pw",
        "train.lr": 0.001,
        "data.tokenizer": "gpt2",
        "tracking.uri2": "https://ghp_TOKEN123@mlflow.example/",
    })
    assert "hunter2" not in masked["tracking.uri"] and "://***@" in masked["tracking.uri"]
    assert masked["data.hf_token"] == masked["extra.api_key"] == masked["extra.password"] == "***"
    assert masked["train.lr"] == "0.001"
    assert masked["data.tokenizer"] == "gpt2"  # an ordinary field that merely contains the letters "token"
    assert "ghp_TOKEN123" not in masked["tracking.uri2"]


@pytest.mark.parametrize("uri,bare,found", [
    ("http://alice:s3cretPW@host:5000", "http://host:5000",
     {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cretPW"}),
    ("https://ghp_TOKEN123@mlflow.example/path", "https://mlflow.example/path",
     {"MLFLOW_TRACKING_TOKEN": "ghp_TOKEN123"}),
    ("http://a%40b:p%3Aw@h", "http://h", {"MLFLOW_TRACKING_USERNAME": "a@b", "MLFLOW_TRACKING_PASSWORD": "p:w"}),
    ("http://host:5000", "http://host:5000", {}),
    ("sqlite:////data/a@b/mlflow.db", "sqlite:////data/a@b/mlflow.db", {}),
])
def test_credentials_split_from_uri(uri, bare, found):
    assert split_credentials(uri) == (bare, found)


def test_credentials_lifted_out_of_config_and_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ghp_TOKEN123@mlflow.example")
    cfg = load_config(None, ["tracking.uri=http://alice:s3cretPW@127.0.0.1:5000"])
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cretPW"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "ghp_TOKEN123"
    text = dump_config(cfg) + str(flatten(cfg.to_dict()))
    assert "s3cretPW" not in text and "ghp_TOKEN123" not in text and "alice" not in text
    env = {}
    lift_credentials(cfg, env)  # already bare: nothing more to lift
    assert env == {}
