"""accelerate's config file as a node layout, and the launcher mistakes refused before any rank starts."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from gptdist.cli import main
from gptdist.errors import UserError
from gptdist.launchers import accelerate_config
from gptdist.launchers.detect import launcher_name
from gptdist.launchers.run_config import resolve_run_config
from tests.accelerate_helpers import DS, accelerate_yaml, refused
from tests.helpers import ROOT, cpu_env


def test_cpu_flag_starts_one_rankless_process(recipe, env_of, as_rank, capsys):
    env = env_of("--cpu", "--num_processes", "2")
    assert "RANK" not in env and env["ACCELERATE_USE_CPU"] == "True"
    as_rank(env)
    line = refused(capsys, recipe)
    assert "--cpu starts one process with no rank" in line and "--use_deepspeed --num_processes N" in line


def test_several_processes_without_a_multi_process_launcher(recipe, env_of, as_rank, capsys):
    env = env_of("--num_processes", "2", "--main_process_port", "29555")  # no --use_deepspeed, no GPUs
    assert "RANK" not in env and "MASTER_PORT" in env
    as_rank(env)
    assert "add --use_deepspeed" in refused(capsys, recipe)


def test_non_standard_multinode_launcher_and_its_local_rank(recipe, env_of, as_rank, capsys, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    env = env_of("--use_deepspeed", "--num_machines", "2", "--num_processes", "4", "--machine_rank", "0",
                 "--main_process_ip", "127.0.0.1", "--main_process_port", "29556",
                 "--deepspeed_multinode_launcher", "nossh", "--deepspeed_hostfile", str(hostfile))
    as_rank(env)
    line = refused(capsys, recipe, before=["--local_rank=0"])  # where the deepspeed launcher puts it under nossh
    assert "through the deepspeed launcher" in line and "--local_rank=0" in line and ".deepspeed_env" in line
    assert "--deepspeed_multinode_launcher standard" in line


def test_local_rank_is_checked_against_the_environment(recipe, as_rank, capsys):
    as_rank({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "CROSS_RANK": "0"})
    line = refused(capsys, recipe, before=["--local_rank=1"])
    assert "--local_rank=1 but LOCAL_RANK='0'" in line and "--no_local_rank" in line
    cfg = resolve_run_config(str(recipe), [], env={"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, local_rank_arg=1)
    assert cfg.parallel.tp == 1  # the deepspeed launcher's default --local_rank=N agrees: accepted


def test_other_local_ranks_stay_quiet(recipe, env_of, as_rank, capsys):
    env = {**env_of(*DS, "--zero_stage", "2"), "LOCAL_RANK": "1", "RANK": "1"}
    as_rank(env)
    assert main(["train", str(recipe), "parallel.zero_stage=1"]) == 2
    assert capsys.readouterr().err == ""  # local rank 0 of this node says it


def test_launcher_is_named(env_of):
    assert launcher_name(env_of(*DS)) == "accelerate"
    assert launcher_name({"RANK": "0", "CROSS_RANK": "0"}) == "deepspeed"
    assert launcher_name({"RANK": "0", "TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert launcher_name({"SLURM_PROCID": "3"}) == "slurm"
    assert launcher_name({}) == "none"


def test_node_layout_from_a_config_file(tmp_path, monkeypatch):
    for var in ("NUM_NODES", "GPUS_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-01 slots=8   # first\ngpu-02 slots=8\n")
    file = accelerate_yaml(tmp_path / "acc.yaml", num_machines=2, num_processes=16, machine_rank=1,
                           main_process_ip="10.0.0.1", main_process_port=29400,
                           deepspeed_config={"deepspeed_hostfile": str(hostfile)})
    config = accelerate_config.load(str(file))
    exported, own = accelerate_config.node_layout(config, str(file), "node")
    assert exported == {"NUM_NODES": "2", "GPUS_PER_NODE": "8", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                        "MASTER_PORT": "29400", "NODE_HOSTS": "gpu-01 gpu-02"}
    assert own == {"GPTDIST_ACCELERATE_CONFIG": str(file.resolve())}
    _, own = accelerate_config.node_layout(config, str(file), "hostfile")
    assert own["GPTDIST_ACCELERATE_HOSTFILE"] == str(hostfile) and own["GPTDIST_ACCELERATE_PROCESSES"] == "16"
    # A variable set in the environment wins, as accelerate's flags win over its file: one file for every node.
    monkeypatch.setenv("NODE_RANK", "0")
    exported, _ = accelerate_config.node_layout(config, str(file), "node")
    assert "NODE_RANK" not in exported and exported["NUM_NODES"] == "2"


@pytest.mark.parametrize("fields,launcher,expected", [
    ({"num_machines": 2, "num_processes": 5}, "node", "num_processes=5 is not a positive multiple of num_machines=2"),
    ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "node", "machine_rank=2 is not in 0..1"),
    ({"num_machines": 2, "main_process_ip": "h"}, "one-node", "launch/train.sh starts one node"),
    ({"num_machines": 2}, "node", "needs main_process_ip"),
    ({}, "hostfile", "no deepspeed_config.deepspeed_hostfile"),
])
def test_node_layout_refusals(tmp_path, fields, launcher, expected):
    file = accelerate_yaml(tmp_path / "acc.yaml", **fields)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        accelerate_config.node_layout(accelerate_config.load(str(file)), str(file), launcher)


def test_unreadable_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_procesess": 2}))
    with pytest.raises(UserError, match="cannot be read by accelerate: .*unknown keys"):
        accelerate_config.load(str(bad))
    with pytest.raises(UserError, match="not found"):
        accelerate_config.load(str(tmp_path / "missing.yaml"))


def test_launch_script_refuses_a_config_file_it_cannot_start(tmp_path):
    """The real launch/train.sh with --accelerate-config: one line and exit 2 before any launcher starts."""
    file = accelerate_yaml(tmp_path / "acc.yaml", num_machines=2, num_processes=4, main_process_ip="127.0.0.1")
    proc = subprocess.run(["bash", "launch/train.sh", "--accelerate-config", str(file), "configs/tiny-cpu.yaml"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"gptdist: accelerate config {file}: num_machines=2, but launch/train.sh starts one node: run launch/node.sh "
        "or launch/accelerate.sh on every node, or launch/hostfile.sh"]


def test_hostfile_launcher_refuses_a_file_whose_processes_do_not_fit_its_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-01 slots=8\n")
    file = accelerate_yaml(tmp_path / "acc.yaml", num_processes=16,
                           deepspeed_config={"deepspeed_hostfile": str(hostfile)})
    proc = subprocess.run(["bash", "launch/hostfile.sh", "--accelerate-config", str(file), "configs/tiny-cpu.yaml"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"hostfile.sh: accelerate config {file.resolve()}: num_processes=16 but its hostfile {hostfile} has 8 slots: "
        "make them agree"]


def test_node_launcher_checks_the_file_s_settings_before_starting(tmp_path):
    """launch/node.sh --accelerate-config: the layout from the file, its settings checked by `gptdist check`."""
    file = accelerate_yaml(tmp_path / "acc.yaml", num_machines=2, num_processes=4, machine_rank=1,
                           main_process_ip="127.0.0.1", main_process_port=29999)
    clean = {k: v for k, v in cpu_env().items()
             if not k.startswith("SLURM_") and k not in ("NODE_RANK", "NUM_NODES", "NODE_HOSTS", "GPUS_PER_NODE",
                                                          "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(["bash", "launch/node.sh", "--accelerate-config", str(file), "configs/tiny-cpu.yaml"],
                          cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # configs/tiny-cpu.yaml says parallel.zero_stage=1; the file's deepspeed_config says zero_stage 2.
    assert proc.stderr.strip().splitlines() == [
        f"gptdist: accelerate config {file.resolve()}: deepspeed_config.zero_stage=2 contradicts parallel.zero_stage=1 "
        "of the recipe: make them agree (parallel.zero_stage=2 on the gptdist command line, or change accelerate's)"]
