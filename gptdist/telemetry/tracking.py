"""MLflow tracking from rank 0: params once, per-step metrics in batches, the resolved config as an artifact.

The default store is an embedded SQLite database in the run directory; `tracking.uri` or $MLFLOW_TRACKING_URI
point elsewhere (a tracking server, a Databricks workspace, ...). Other ranks get a NullTracker.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional
from urllib.parse import urlparse

from gptdist.config import TrackingConfig
from gptdist.errors import UserError
from gptdist.launchers.detect import launcher_name
from gptdist.telemetry.retry import RetryingSender, fail_fast_http

# A key that names a secret as a whole word (hf_token, api-key, password), not one that merely contains the letters
# (data.tokenizer, train.max_tokens).
_SECRET_KEY = re.compile(r"(^|[._-])(tokens?|secrets?|password|passwd|api[_-]?key|credentials?|auth)($|[._-])",
                         re.IGNORECASE)
_SECRET_VALUE = re.compile(r"://[^/\s@]+@")  # user:password@ or token@ inside a URI


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
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and text:
            text = "***"
        text = _SECRET_VALUE.sub("://***@", text)
        masked[key] = text[:6000]
    return masked


def default_store(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_store(run_dir)


class NullTracker:
    run_id: Optional[str] = None
    uri: Optional[str] = None

    def log_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, written through `RetryingSender` (retry.py), with MLflow's system metrics (CPU, memory,
    disk, network and, where there are GPUs, their utilization and memory) sampled from rank 0's node."""

    def __init__(self, cfg: TrackingConfig, uri: str, client, run_id: str, resumed: bool, warn) -> None:
        self.cfg, self.uri, self.client, self.run_id = cfg, uri, client, run_id
        self.monitor = None
        self.sender = RetryingSender(client, run_id, uri, warn, on_recovery=self._start_system_metrics)
        self.sender.start_background()  # the step only appends; the server is written from a thread of its own
        self._start_system_metrics(resume=resumed)

    def _start_system_metrics(self, resume: bool = True) -> None:
        """(Re)start MLflow's sampler; it stops by itself when the server cannot be reached, so it is started again
        when the server answers."""
        if not self.cfg.system_metrics or (self.monitor is not None and self.monitor._process is not None
                                           and self.monitor._process.is_alive()):
            return
        try:
            # mlflow: slow to import, only when MLflow is used
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                                resume_logging=resume, tracking_uri=self.uri)
            self.monitor.start()
        except Exception:  # noqa: BLE001 - system metrics are a bonus; psutil missing or the server down
            self.monitor = None

    def log_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        # mlflow: slow to import, only when MLflow is used
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
        self.sender.add_metrics(metrics)

    def log_artifact(self, path: Path) -> None:
        self.sender.add_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            try:
                if getattr(self.monitor, "_logging_step", 1) == 0:
                    # A run shorter than one sampling interval: MLflow's sampler would stop without logging its
                    # first sample; log it, so that every run has its system metrics.
                    self.monitor.publish_metrics(self.monitor.aggregate_metrics())
                self.monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        self.sender.drain(self.cfg.flush_timeout_s)
        self.sender.call(lambda: self.client.set_terminated(self.run_id, status=status))


def _client(uri: str):
    # mlflow: slow to import, only when MLflow is used
    from mlflow.tracking import MlflowClient

    # MLflow announces its database migrations at INFO; the run's own log is what the user reads.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    fail_fast_http()
    return MlflowClient(tracking_uri=uri)


def _store_exists(uri: str) -> bool:
    """An SQLite store that is not there any more is unreachable (opening it would create an empty one)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).is_file()
    return True


def _new_run(client, cfg: TrackingConfig, uri: str, run_dir: Path, run_name: str, params: Dict[str, Any],
             tags: Dict[str, str]) -> str:
    # mlflow: slow to import, only when MLflow is used
    from mlflow.entities import Param

    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):
            # Keep artifacts beside the database instead of ./mlruns of whatever directory we were started in.
            location = (run_dir / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"gptdist.run_dir": str(run_dir.resolve()), **tags})
    items = [Param(k, v) for k, v in mask_secrets(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def start_tracker(cfg: TrackingConfig, run_dir: Path, run_name: str, params: Dict[str, Any],
                  resumed: Optional[Dict[str, Any]] = None, warn=None,
                  resumed_from: Optional[Path] = None) -> NullTracker:
    """Open the MLflow run, or explain why not: fail, or warn and keep the local metrics.jsonl only.

    resumed: the checkpoint's state when resuming; resumed_from: that checkpoint's folder. A resumed run tracks
    where its own config says (tracking.uri, $MLFLOW_TRACKING_URI, else its run directory's store), never where a
    checkpoint says: a checkpoint may come from someone else. It continues the recorded MLflow run when that run is
    in the store the config names, and, with no store named, when it is in the default store beside the checkpoint
    it resumes (so `run.dir=runs/b resume=runs/a` keeps writing into runs/a's SQLite store). Otherwise, or when that
    run cannot be reached, a new run starts, tagged with its parent (mlflow.parentRunId)."""
    if not cfg.enabled:
        return NullTracker()
    warn = warn or (lambda message: warnings.warn(message, stacklevel=2))
    here = tracking_uri(cfg, run_dir)
    launcher = {"gptdist.launcher": launcher_name(os.environ)}
    parent = (resumed or {}).get("mlflow_run_id")
    try:
        if parent:
            explicit = bool(cfg.uri or os.environ.get("MLFLOW_TRACKING_URI"))
            saved_uri = _SECRET_VALUE.sub("://", str(resumed.get("tracking_uri") or ""))
            beside = resumed_from is not None and saved_uri == default_store(Path(resumed_from).parent.parent)
            uri = saved_uri if beside and not explicit else here
            problem = None
            if _store_exists(uri):
                client = _client(uri)
                try:
                    client.get_run(parent)
                    # Keep writing into the run the first attempt created; the launcher tag says the latest attempt's.
                    client.update_run(parent, status="RUNNING")
                    client.set_tag(parent, "gptdist.launcher", launcher["gptdist.launcher"])
                    return MlflowTracker(cfg, uri, client, parent, True, warn)
                except Exception as exc:  # noqa: BLE001 - not found, or the server is down
                    problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            else:
                problem = "its store is not there any more"
            warn(f"MLflow run {parent} at {uri} cannot be continued ({problem}); starting a new run in {here} "
                 "tagged with it as parent")
            client = _client(here)
            tags = {"mlflow.parentRunId": parent, "gptdist.resumed_from_run": parent,
                    "gptdist.resumed_from_uri": str(saved_uri), **launcher}
            return MlflowTracker(cfg, here, client, _new_run(client, cfg, here, run_dir, run_name, params, tags),
                                 False, warn)
        client = _client(here)
        return MlflowTracker(cfg, here, client, _new_run(client, cfg, here, run_dir, run_name, params, launcher),
                             False, warn)
    except Exception as exc:  # noqa: BLE001 - any client/server failure means the same thing to the user
        message = f"MLflow tracking at {here} is unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        if cfg.on_unreachable == "fail":
            raise UserError(f"{message}; start the server, fix tracking.uri, or set "
                            "tracking.on_unreachable=warn") from None
        warn(f"{message}; training on with metrics in metrics.jsonl only")
        return NullTracker()


def preflight(cfg: TrackingConfig, run_dir: Path) -> Optional[str]:
    """Before any process group exists: can the tracking server be reached at all?

    Returns a warning when it cannot and tracking.on_unreachable=warn (the caller then trains without MLflow);
    raises UserError when it is 'fail'. Only http(s) URIs are probed, with a plain TCP connect, because MLflow's
    own client retries for minutes before it gives up."""
    if not cfg.enabled:
        return None
    uri = tracking_uri(cfg, run_dir)
    try:
        parsed = urlparse(uri)
        port = parsed.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535"
        where = "tracking.uri" if cfg.uri else "$MLFLOW_TRACKING_URI"
        raise UserError(f"{where}={uri[:120]!r} is not a valid URI ({exc}); write e.g. http://HOST:5000") from None
    if parsed.scheme not in ("http", "https"):
        return None
    if not parsed.hostname:
        raise UserError(f"tracking URI {uri[:120]!r} names no host; write e.g. http://HOST:5000")
    port = port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5):
            return None
    except OSError as exc:
        message = f"MLflow tracking server {uri} cannot be reached ({exc.strerror or exc})"
        if cfg.on_unreachable == "fail":
            raise UserError(f"{message}; start it (launch/mlflow-server.sh), fix tracking.uri, "
                            "or set tracking.on_unreachable=warn") from None
        return f"{message}; training on with metrics in metrics.jsonl only (tracking.on_unreachable=warn)"
