"""MLflow calls that never stop training: what the server does not take now is kept and sent when it answers.

A tracking server restarted, a network blip, a database briefly locked: rank 0 must train on. Every call to the
server goes through `RetryingSender`. A failed call keeps its metrics (and artifacts) in memory, warns once, and the
next attempt waits 2, 4, 8 ... up to 60 s (training steps in between do not wait at all); the first call that goes
through again sends everything missed, in order. metrics.jsonl holds every point meanwhile. At the end of the run
`drain` keeps trying for `flush_timeout_s` before it gives up with one warning.

MLflow's own HTTP client would retry each request for minutes (7 retries, doubling back-off) and block the step
that logs; it is told to fail fast instead (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT, unless the user set them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, List, Optional

MAX_BACKOFF_S = 60.0


def fail_fast_http() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class RetryingSender:
    def __init__(self, client, run_id: str, uri: str, warn: Callable[[str], None],
                 on_recovery: Optional[Callable[[], None]] = None, clock=time.monotonic, sleep=time.sleep):
        self.client, self.run_id, self.uri, self.warn = client, run_id, uri, warn
        self.on_recovery = on_recovery
        self.clock, self.sleep = clock, sleep
        self.metrics: List = []  # mlflow.entities.Metric not yet accepted by the server
        self.artifacts: List[Path] = []
        self.failures = 0  # consecutive failed attempts
        self.next_try = 0.0
        self.missed = 0  # points that had to wait, for the recovery message

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def add_metrics(self, metrics: List) -> None:
        self.metrics.extend(metrics)
        if not self.healthy:
            self.missed += len(metrics)
        self.try_send()

    def add_artifact(self, path: Path) -> None:
        self.artifacts.append(path)
        self.try_send()

    def try_send(self, force: bool = False) -> bool:
        """Send what is pending, unless the last failure asked to wait a little longer. True when nothing is left."""
        if not self.metrics and not self.artifacts:
            return True
        if not force and self.clock() < self.next_try:
            return False
        try:
            while self.metrics:
                batch = self.metrics[:1000]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.metrics[:1000]
            while self.artifacts:
                self.client.log_artifact(self.run_id, str(self.artifacts[0]))
                self.artifacts.pop(0)
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the run goes on
            self._failed(exc)
            return False
        if self.failures:
            self.warn(f"MLflow tracking at {self.uri} answers again: {self.missed} metric point(s) that waited "
                      "were sent")
            self.failures, self.missed = 0, 0
            if self.on_recovery is not None:
                self.on_recovery()
        return True

    def call(self, fn: Callable[[], object]) -> bool:
        """A one-off call (tags, run status): tried once now, warned about when it fails."""
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the run goes on
            self._failed(exc)
            return False

    def drain(self, flush_timeout_s: float) -> bool:
        """At the end of the run: keep trying until everything is sent or the time is up."""
        deadline = self.clock() + flush_timeout_s
        while not self.try_send(force=True):
            if self.clock() >= deadline:
                self.warn(f"MLflow tracking at {self.uri} did not answer for {flush_timeout_s:.0f} s at the end of "
                          f"the run: {len(self.metrics)} metric point(s) were not sent (metrics.jsonl has them all)")
                return False
            self.sleep(min(5.0, max(0.5, deadline - self.clock())))
        return True

    def _failed(self, exc: BaseException) -> None:
        if self.failures == 0:
            self.missed = len(self.metrics)
            self.warn(f"MLflow tracking at {self.uri} failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training goes on with metrics.jsonl, "
                      "and the missed points are sent once the server answers")
        self.failures += 1
        self.next_try = self.clock() + min(MAX_BACKOFF_S, 2.0 ** self.failures)
