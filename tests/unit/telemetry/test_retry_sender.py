"""MLflow sending never costs a step: a slow or failing server is written from a thread of its own, every point
arrives in order once it answers, and the end of the run drains what is left."""

import threading
import time

from gptdist.telemetry.retry import RetryingSender


class _SlowFlakyClient:
    def __init__(self, failures: int, delay_s: float):
        self.failures, self.delay_s = failures, delay_s
        self.got, self.calls = [], 0
        self.sending = threading.Event()

    def log_batch(self, run_id, metrics):
        self.calls += 1
        self.sending.set()
        time.sleep(self.delay_s)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("server restarting")
        self.got.extend(metrics)

    def log_artifact(self, run_id, path):
        self.got.append(("artifact", path))


def test_a_slow_failing_server_costs_the_step_nothing_and_loses_nothing():
    client = _SlowFlakyClient(failures=2, delay_s=0.3)
    warnings = []
    sender = RetryingSender(client, "run", "http://tracking", warnings.append)
    sender.start_background(period_s=0.05)
    sender.add_metrics([0])
    assert client.sending.wait(5)
    start = time.perf_counter()
    for point in range(1, 200):  # while a send hangs on the server
        sender.add_metrics([point])
    sender.add_artifact("curves.png")
    assert time.perf_counter() - start < 0.1  # the step only appends
    assert sender.drain(flush_timeout_s=30)
    assert client.got == [*range(200), ("artifact", "curves.png")]
    assert any("failed" in w for w in warnings) and any("answers again" in w for w in warnings)
    assert sender._thread is None  # the drain stopped the thread


def test_without_the_thread_sending_is_synchronous():
    client = _SlowFlakyClient(failures=0, delay_s=0)
    sender = RetryingSender(client, "run", "file:x", lambda m: None)
    sender.add_metrics([1, 2])
    assert client.got == [1, 2]
