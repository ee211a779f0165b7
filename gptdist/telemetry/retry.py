"""MLflow calls that never stop training: what the server does not take now is kept and sent when it answers.

A tracking server restarted, a network blip, a database briefly locked: rank 0 must train on. Every call to the
server goes through `RetryingSender`. A failed call keeps its metrics (and artifacts) in memory, warns once, and the
next attempt waits 2, 4, 8 ... up to 60 s (training steps in between do not wait at all); the first call that goes
through again sends everything missed, in order. metrics.jsonl holds every point meanwhile. At the end of the run
`drain` keeps trying for `flush_timeout_s` before it gives up with one warning.

The sending happens on a background thread (`start_background`): the training step only appends to a list, so a
slow server, SQLite's commit or a 20 s HTTP time-out never costs a step. One-off calls (tags, the run's status) and
the final drain wait for the thread's send in flight, never the other way round.

MLflow's own HTTP client would retry each request for minutes (7 retries, doubling back-off) and block the step
that logs; it is told to fail fast instead (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT, unless the user set them).
"""

from __future__ import annotations

import os
import threading
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
        self._pending = threading.Lock()  # guards the two lists: the step appends, the sender takes
        self._sending = threading.Lock()  # one conversation with the client at a time
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    def start_background(self, period_s: float = 1.0) -> None:
        """Send from a daemon thread from now on: woken by every add, and every `period_s` to retry."""
        def loop() -> None:
            while not self._stop:
                self._wake.wait(timeout=period_s)
                self._wake.clear()
                if not self._stop:
                    self.try_send()

        self._thread = threading.Thread(target=loop, name="gptdist-mlflow-sender", daemon=True)
        self._thread.start()

    def stop_background(self, timeout_s: float = 30.0) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join(timeout=timeout_s)
            self._thread = None

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def add_metrics(self, metrics: List) -> None:
        with self._pending:
            self.metrics.extend(metrics)
            if not self.healthy:
                self.missed += len(metrics)
        self._kick()

    def add_artifact(self, path: Path) -> None:
        with self._pending:
            self.artifacts.append(path)
        self._kick()

    def _kick(self) -> None:
        if self._thread is not None:
            self._wake.set()
        else:
            self.try_send()

    def try_send(self, force: bool = False) -> bool:
        """Send what is pending, unless the last failure asked to wait a little longer. True when nothing is left."""
        with self._sending:
            if not self.metrics and not self.artifacts:
                return True
            if not force and self.clock() < self.next_try:
                return False
            try:
                self._send_pending()
            except Exception as exc:  # noqa: BLE001 - whatever the client raises, the run goes on
                self._failed(exc)
                return False
            return self._recovered()

    def _send_pending(self) -> None:
        """Batches of 1000 in order; what the client took leaves the list only after it took it."""
        while True:
            with self._pending:
                batch = self.metrics[:1000]
            if not batch:
                break
            self.client.log_batch(self.run_id, metrics=batch)
            with self._pending:
                del self.metrics[:len(batch)]
        while True:
            with self._pending:
                if not self.artifacts:
                    return
                path = self.artifacts[0]
            self.client.log_artifact(self.run_id, str(path))
            with self._pending:
                self.artifacts.pop(0)

    def _recovered(self) -> bool:
        if self.failures:
            self.warn(f"MLflow tracking at {self.uri} answers again: {self.missed} metric point(s) that waited "
                      "were sent")
            self.failures, self.missed = 0, 0
            if self.on_recovery is not None:
                self.on_recovery()
        return True

    def call(self, fn: Callable[[], object]) -> bool:
        """A one-off call (tags, run status): tried once now, warned about when it fails."""
        with self._sending:
            try:
                fn()
                return True
            except Exception as exc:  # noqa: BLE001 - whatever the client raises, the run goes on
                self._failed(exc)
                return False

    def drain(self, flush_timeout_s: float) -> bool:
        """At the end of the run: keep trying until everything is sent or the time is up."""
        deadline = self.clock() + flush_timeout_s
        self.stop_background(timeout_s=flush_timeout_s)
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
