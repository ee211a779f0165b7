"""What goes to MLflow as params: the flattened config, never a credential."""

from gptdist.config import load_config
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
    })
    assert "hunter2" not in masked["tracking.uri"] and "://***@" in masked["tracking.uri"]
    assert masked["data.hf_token"] == masked["extra.api_key"] == masked["extra.password"] == "***"
    assert masked["train.lr"] == "0.001"
