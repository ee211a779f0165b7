"""MLflow tracking from rank 0: params once, per-step metrics in batches, the resolved config as an artifact.

The default store is an embedded SQLite database in the run directory; `tracking.uri` or $MLFLOW_TRACKING_URI
point elsewhere (a tracking server, a Databricks workspace, ...). Other ranks get a NullTracker.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from gptdist.config import TrackingConfig
from gptdist.errors import UserError
from gptdist.launchers.detect import launcher_name

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|auth)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"(://[^/\s:@]+:[^/\s@]+@)")  # user:password@ inside a URI


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def mask_secrets(params: Dict[str, Any]) -> Dict[str, str]:
    """Logged params must never carry credentials, even when a user put one in a config value."""
    masked = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        if _SECRET_KEY.search(key) and text:
            text = "***"
        text = _SECRET_VALUE.sub("://***@", text)
        masked[key] = text[:6000]
    return masked


def tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class NullTracker:
    run_id: Optional[str] = None

    def log_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, params: Dict[str, Any], run_id: Optional[str]):
        import logging

        from mlflow.tracking import MlflowClient

        # MLflow announces its database migrations at INFO; the run's own log is what the user reads.
        logging.getLogger("mlflow").setLevel(logging.WARNING)

        self.uri = tracking_uri(cfg, run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        # Which launcher started the ranks (accelerate, deepspeed, torchrun, slurm or none); on a resumed run, the
        # latest attempt's.
        launcher = {"gptdist.launcher": launcher_name(os.environ)}
        if run_id is not None:
            # Resuming: keep writing into the run the first attempt created.
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "gptdist.launcher", launcher["gptdist.launcher"])
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:"):
                # Keep artifacts beside the database instead of ./mlruns of whatever directory we were started in.
                location = (run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={"gptdist.run_dir": str(run_dir.resolve()), **launcher})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in mask_secrets(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics: List[Metric] = []
        for record in records:
            step = int(record["step"])
            for key, value in record.items():
                if key == "step" or value is None:
                    continue
                if isinstance(value, (int, float)):  # bools too: `skipped` becomes 0/1
                    metrics.append(Metric(key, float(value), now, step))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def start_tracker(
    cfg: TrackingConfig, run_dir: Path, run_name: str, params: Dict[str, Any], run_id: Optional[str] = None
) -> NullTracker:
    """Open the MLflow run, or explain why not: fail, or warn and keep the local metrics.jsonl only."""
    if not cfg.enabled:
        return NullTracker()
    try:
        return MlflowTracker(cfg, run_dir, run_name, params, run_id)
    except Exception as exc:  # noqa: BLE001 - any client/server failure means the same thing to the user
        uri = tracking_uri(cfg, run_dir)
        message = f"MLflow tracking at {uri} is unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        if cfg.on_unreachable == "fail":
            raise UserError(f"{message}; start the server, fix tracking.uri, or set tracking.on_unreachable=warn") from None
        warnings.warn(f"{message}; training on with metrics in metrics.jsonl only", stacklevel=2)
        return NullTracker()


def preflight(cfg: TrackingConfig, run_dir: Path) -> Optional[str]:
    """Before any process group exists: can the tracking server be reached at all?

    Returns a warning when it cannot and tracking.on_unreachable=warn (the caller then trains without MLflow);
    raises UserError when it is 'fail'. Only http(s) URIs are probed, with a plain TCP connect, because MLflow's
    own client retries for minutes before it gives up."""
    import socket
    from urllib.parse import urlparse

    if not cfg.enabled:
        return None
    uri = tracking_uri(cfg, run_dir)
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5):
            return None
    except OSError as exc:
        message = f"MLflow tracking server {uri} cannot be reached ({exc.strerror or exc})"
        if cfg.on_unreachable == "fail":
            raise UserError(f"{message}; start it (launch/mlflow-server.sh), fix tracking.uri, "
                            "or set tracking.on_unreachable=warn") from None
        return f"{message}; training on with metrics in metrics.jsonl only (tracking.on_unreachable=warn)"
