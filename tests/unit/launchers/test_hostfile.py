"""Several nodes without Slurm: one `launch/node.sh` per node (deepspeed --no_ssh) trains the same model as all
ranks on one node; and the launch scripts refuse bad input before anything starts.

Here the "nodes" are two launchers on this machine, talking over loopback under two distinct node names.
"""

import os
import subprocess

import pytest

from tests.helpers import ROOT, cpu_env

STEPS = 10
# tp 2 x dp 2 over 2 nodes x 2 ranks: tensor parallel inside a node, data parallel across nodes, as on GPUs.
LAYOUT = {"tp": 2, "pp": 1, "zero_stage": 1}
TRAIN = {"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 5}






# ------------------------------------------------------------------------------------ refusals, before any launch


def _run(*cmd, env=None):
    return subprocess.run(["bash", *cmd], cwd=ROOT, env=cpu_env(env), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("lines,line_no,reason", [
    ("a slots=2\nb\n", 2, "no slots"),
    ("a slots=2\n# fine\nb slots=two\n", 3, "slots must be a positive whole number"),
    ("a slots=0\n", 1, "slots must be a positive whole number"),
    ("a slots=2 gpus=2\n", 1, "unexpected text"),
    ("a 2\n", 1, "is not slots=N"),
    ("a slots=2\nb slots=2\na slots=2\n", 3, "already listed on line 1"),
])
def test_hostfile_bad_line_names_it(tmp_path, lines, line_no, reason):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(lines)
    proc = _run("launch/hostfile.sh", str(hostfile), "configs/tiny-cpu.yaml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"line {line_no}: " in proc.stderr and reason in proc.stderr, proc.stderr


def test_hostfile_comments_and_blank_lines_are_fine(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\nnode-a slots=8   # the first\n  node-b slots=8\n")
    proc = _run("launch/hostfile.sh", "--check", str(hostfile))
    assert proc.returncode == 0, proc.stderr
    assert "2 node(s) (node-a node-b), 16 rank(s)" in proc.stdout


def test_hostfile_without_hosts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nothing yet\n")
    proc = _run("launch/hostfile.sh", str(hostfile), "configs/tiny-cpu.yaml")
    assert proc.returncode == 2 and "lists no hosts" in proc.stderr


def test_sbatch_refuses_unknown_config_before_srun():
    # Run as a plain script: the check comes first, so it needs no Slurm.
    proc = _run("slurm/train.sbatch", "configs/no-such-recipe.yaml", "train.steps=5")
    assert proc.returncode == 2
    assert "configs/no-such-recipe.yaml not found" in proc.stderr


@pytest.mark.parametrize("env,message", [
    ({"NUM_NODES": "2"}, "no NODE_HOSTS"),
    ({"NUM_NODES": "2", "NODE_HOSTS": "a a", "MASTER_PORT": "29999"}, "must be distinct"),
    ({"NUM_NODES": "2", "NODE_HOSTS": "a", "MASTER_PORT": "29999"}, "only 1 host(s)"),
    ({"NUM_NODES": "2", "NODE_RANK": "2", "NODE_HOSTS": "a b"}, "NODE_RANK=2 is not a whole number in 0..1"),
    ({"NUM_NODES": "2", "NODE_HOSTS": "a b"}, "set MASTER_PORT"),
])
def test_node_launcher_refuses_inconsistent_environment(env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "launch/node.sh", "configs/tiny-cpu.yaml"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**clean, "NODE_RANK": "0", **env})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
