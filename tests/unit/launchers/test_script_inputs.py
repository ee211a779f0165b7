"""The launch scripts read numbers from the environment and their arguments; each is checked to be a whole number
before bash arithmetic sees it (arithmetic evaluates a name or subscript it is handed, and a command substitution
inside one). A hostile value runs nothing and ends in one line with exit status 2; mlflow-server.sh hands the
options after `--` to the server."""

import os
import subprocess

import pytest

from tests.helpers import ROOT, cpu_env


def _bash(args, env, tmp_path, path_first=None):
    full = cpu_env(env)
    if path_first is not None:
        full["PATH"] = f"{path_first}:{full['PATH']}"
    return subprocess.run(["bash", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script,env", [
    (["launch/train.sh", "CONFIG"], {"GPUS_PER_NODE": "BASH_VERSINFO[$(touch MARK)0]"}),
    (["launch/train.sh", "CONFIG"], {"GPUS_PER_NODE": "2", "MASTER_PORT": "a[$(touch MARK)0]"}),
    (["launch/train.sh", "CONFIG"], {"GPUS_PER_NODE": "2", "MASTER_PORT": "70000"}),
    (["launch/node.sh", "CONFIG"], {"NUM_NODES": "x[$(touch MARK)0]", "GPUS_PER_NODE": "2"}),
    (["launch/node.sh", "CONFIG"], {"NUM_NODES": "2", "NODE_RANK": "y[$(touch MARK)0]", "NODE_HOSTS": "a b",
                                    "GPUS_PER_NODE": "2", "MASTER_PORT": "29500"}),
    (["launch/node.sh", "CONFIG"], {"NUM_NODES": "1", "GPUS_PER_NODE": "2", "SLURM_JOB_ID": "z[$(touch MARK)0]"}),
    (["launch/node.sh", "CONFIG"], {"NUM_NODES": "1", "GPUS_PER_NODE": "2", "SLURM_JOB_ID": "12",
                                    "SLURM_RESTART_COUNT": "r[$(touch MARK)0]"}),
    (["launch/accelerate.sh", "CONFIG"], {"NUM_NODES": "1", "GPUS_PER_NODE": "g[$(touch MARK)0]"}),
    (["slurm/local-cluster.sh", "status"], {"LOCAL_SLURM_NODES": "n[$(touch MARK)0]"}),
    (["launch/mlflow-server.sh", "--port", "p[$(touch MARK)0]"], {}),
    (["launch/mlflow-server.sh", "--workers", "w[$(touch MARK)0]"], {}),
])
def test_hostile_number_runs_nothing(script, env, tmp_path):
    mark = tmp_path / "touched"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 1\n")
    args = [str(recipe) if a == "CONFIG" else a.replace("MARK", str(mark)) for a in script]
    env = {k: v.replace("MARK", str(mark)) for k, v in env.items()}
    # deepspeed, accelerate and mlflow stand-ins that record being started: none may be.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("deepspeed", "accelerate", "mlflow"):
        (bin_dir / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/started-{tool}\n")
        (bin_dir / tool).chmod(0o755)
    proc = _bash(args, env, tmp_path, path_first=bin_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not mark.exists(), "the command inside the value ran"
    assert not list(tmp_path.glob("started-*")), "a launcher was started"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ("is not a whole number" in lines[0] or "is not a port number" in lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr


def test_mlflow_server_passes_options_after_double_dash(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "argv"
    (bin_dir / "mlflow").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\n')
    (bin_dir / "mlflow").chmod(0o755)
    store = tmp_path / "store"
    proc = _bash(["launch/mlflow-server.sh", "--host", "0.0.0.0", "--port", "5123", "--store", str(store), "--",
                  "--allowed-hosts", "h:5000"], {}, tmp_path, path_first=bin_dir)
    assert proc.returncode == 0, proc.stderr
    argv = seen.read_text().splitlines()
    assert argv[0] == "server" and argv[-2:] == ["--allowed-hosts", "h:5000"], argv
    assert not (ROOT / "--allowed-hosts").exists() and not (ROOT / "h:5000").exists()
    assert (store / "artifacts").is_dir() and os.listdir(store) == ["artifacts"]


def test_credentials_in_an_override_leave_the_command_line_before_the_launcher(tmp_path):
    """launch/*.sh move user:password@ and token@ out of a tracking.uri=... override into MLflow's variables
    before the launcher (which logs its command line) sees the arguments."""
    script = tmp_path / "lift.sh"
    script.write_text(
        f"source {ROOT}/launch/common.sh\n"
        "gptdist_lift_credentials cfg.yaml 'tracking.uri=http://al%40ice:s3cret%3APW@h:5000/x' train.steps=3\n"
        'printf "%s\\n" "${gptdist_args[@]}" "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD"\n'
        "gptdist_lift_credentials 'tracking.uri=https://ghpTOKEN@h'\n"
        'printf "%s\\n" "${gptdist_args[@]}" "$MLFLOW_TRACKING_TOKEN"\n')
    proc = _bash([str(script)], {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["cfg.yaml", "tracking.uri=http://h:5000/x", "train.steps=3", "al@ice",
                                        "s3cret:PW", "tracking.uri=https://h", "ghpTOKEN"]
    for name in ("train.sh", "node.sh", "accelerate.sh"):
        text = (ROOT / "launch" / name).read_text()
        lift = text.index('gptdist_lift_credentials "$@"')
        assert lift < text.index("gptdist.cli check") and lift < text.index("exec " if name != "train.sh" else
                                                                             "deepspeed --log_level"), name
