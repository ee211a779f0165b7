"""Fixtures of the launcher tests: a real local Slurm cluster (slurm/local-cluster.sh) and a real MLflow server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.helpers import ROOT
from tests.slurm_helpers import _sh


@pytest.fixture(scope="module")
def cluster():
    was_up = _sh("bash", "slurm/local-cluster.sh", "status").returncode == 0
    if not was_up:
        up = _sh("bash", "slurm/local-cluster.sh", "up", timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not was_up:
        _sh("bash", "slurm/local-cluster.sh", "down", timeout=120)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`launch/mlflow-server.sh` on a free port with its SQLite store in a temporary folder; yields the URI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = tmp_path_factory.mktemp("mlflow-server")
    log = open(store / "server.log", "w")
    # Its own session, so that the server and its workers are stopped together, by this process group's id.
    server = subprocess.Popen(["bash", "launch/mlflow-server.sh", "--port", str(port), "--store", str(store)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (store / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not answer within 120 s"
            time.sleep(0.5)
        assert f"MLflow tracking URI: {uri}" in (store / "server.log").read_text()
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
