"""accelerate's settings in gptdist's terms, without starting any process.

The environment a rank would get is computed by accelerate's own launch code from real `accelerate launch` flags and
config files (tests/accelerate_helpers.py); the config files are read by accelerate's own loader. Then gptdist's
mapping: a setting the recipe leaves open is taken, one it contradicts is refused with exit status 2 and one line
naming both values, and so is each launcher mistake.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from gptdist.cli import main
from gptdist.errors import UserError
from gptdist.launchers import accelerate_config
from gptdist.launchers.detect import launcher_name
from gptdist.launchers.run_config import resolve_run_config
from gptdist.parallel.layout import Layout
from gptdist.engine.ds_config import build_ds_config
from tests.accelerate_helpers import RANK_VARIABLES, accelerate_yaml, open_recipe, rank_environment
from tests.helpers import ROOT, cpu_env


@pytest.fixture
def recipe(tmp_path) -> Path:
    """2 ranks: micro-batch 4, global batch 8 (so gptdist derives 1 accumulation step at dp=2); no zero_stage set.
    The data paths are never opened here."""
    return open_recipe(tmp_path / "recipe.yaml", tmp_path / "corpus", tmp_path / "tokenizer.json", tmp_path / "run")


@pytest.fixture
def env_of(tmp_path):
    def compute(*flags: str):
        return rank_environment(flags, tmp_path / "no-default-config.yaml")
    return compute


@pytest.fixture
def as_rank(monkeypatch):
    """Make this process look like a rank with the given environment (launcher variables cleared first)."""
    def apply(env):
        for key in list(os.environ):
            if key.startswith(("ACCELERATE_", "SLURM_", "TORCHELASTIC_")) or key in RANK_VARIABLES:
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return apply


def _refused(capsys, recipe: Path, *args: str, before=()) -> str:
    """`gptdist [BEFORE] train RECIPE ARGS` in this process (the same main() a rank runs): exit 2 and one line."""
    code = main([*before, "train", str(recipe), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gptdist: ")
    return lines[0]


DS = ["--use_deepspeed", "--num_processes", "2", "--main_process_port", "0"]


# ------------------------------------------------------------------------------------ settings that are honoured


def test_command_line_settings_fill_what_the_recipe_leaves_open(recipe, env_of, tmp_path):
    env = env_of(*DS, "--zero_stage", "2", "--mixed_precision", "bf16", "--gradient_clipping", "0.5",
                 "--gradient_accumulation_steps", "1")
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    cfg = resolve_run_config(str(recipe), [], env=env)
    assert (cfg.parallel.zero_stage, cfg.train.precision, cfg.train.grad_clip) == (2, "bf16", 0.5)
    # The same values given in the recipe agree, so nothing is refused.
    same = resolve_run_config(str(recipe), ["parallel.zero_stage=2", "train.grad_clip=0.5"], env=env)
    assert same == cfg


def test_defaults_of_the_command_line_ask_for_nothing(recipe, env_of):
    env = env_of(*DS)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # accelerate's default, not a choice
    cfg = resolve_run_config(str(recipe), ["train.precision=bf16"], env=env)
    assert (cfg.parallel.zero_stage, cfg.train.precision, cfg.train.grad_clip) == (0, "bf16", 1.0)


def test_config_file_settings_same_by_environment_and_by_file(recipe, env_of, tmp_path):
    """One accelerate config file, two routes: `accelerate launch --config_file F` (the ranks read ACCELERATE_*)
    and gptdist's own launchers (`--accelerate-config F`, read with accelerate's loader). Both give the same run."""
    file = accelerate_yaml(tmp_path / "acc.yaml", mixed_precision="bf16", deepspeed_config={"gradient_clipping": 0.25})
    env = env_of("--config_file", str(file), "--main_process_port", "0")
    assert "zero_stage" in env["ACCELERATE_CONFIG_DS_FIELDS"]
    by_env = resolve_run_config(str(recipe), [], env=env)
    by_file = resolve_run_config(str(recipe), [], env={}, world_size=2, accelerate_config=str(file))
    assert by_env == by_file
    assert (by_env.parallel.zero_stage, by_env.train.precision, by_env.train.grad_clip) == (2, "bf16", 0.25)


def test_no_mixed_precision_in_a_config_file_means_fp32(recipe, env_of, tmp_path):
    file = accelerate_yaml(tmp_path / "acc.yaml")  # mixed_precision: 'no', as `accelerate config` writes it
    env = env_of("--config_file", str(file), "--main_process_port", "0")
    assert resolve_run_config(str(recipe), [], env=env).train.precision == "fp32"


def test_deepspeed_file_auto_values_are_gptdist_s(recipe, env_of, tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": "auto"},
    }))
    env = env_of(*DS, "--deepspeed_config_file", str(ds_file))
    cfg = resolve_run_config(str(recipe), [], env=env)
    assert cfg.parallel.zero_stage == 2 and cfg.train.deepspeed_config == str(ds_file.resolve())
    ds = build_ds_config(cfg, Layout.resolve(cfg, 2), "fp32")
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"]["overlap_comm"] is True
    # "auto" never reaches DeepSpeed: gptdist's own bucket size where it sets one, else DeepSpeed's default.
    without_file = resolve_run_config(str(recipe), ["parallel.zero_stage=2"], env={}, world_size=2)
    plain = build_ds_config(without_file, Layout.resolve(without_file, 2), "fp32")
    assert ds["zero_optimization"].get("reduce_bucket_size") == plain["zero_optimization"].get("reduce_bucket_size")
    # gptdist's own ZeRO-1/2 default survives because the stage became parallel.zero_stage, not just a JSON key.
    assert ds["zero_optimization"]["use_multi_rank_bucket_allreduce"] is False


def test_equal_gradient_accumulation_is_accepted(recipe, env_of):
    env = env_of(*DS, "--gradient_accumulation_steps", "2")
    cfg = resolve_run_config(str(recipe), ["train.global_batch_size=16"], env=env)
    assert Layout.resolve(cfg, 2).grad_accum == 2


# ------------------------------------------------------------------------------------ contradictions: exit 2, one line


@pytest.mark.parametrize("flags,overrides,expected", [
    (["--zero_stage", "2"], ["parallel.zero_stage=1"], ["zero_stage=2", "parallel.zero_stage=1"]),
    (["--mixed_precision", "bf16"], ["train.precision=fp32"], ["mixed_precision=bf16", "train.precision=fp32"]),
    (["--gradient_clipping", "0.5"], ["train.grad_clip=1.0"], ["gradient_clipping=0.5", "train.grad_clip=1.0"]),
    (["--gradient_accumulation_steps", "4"], [], ["gradient_accumulation_steps=4", "derives",
                                                  "train.global_batch_size=32"]),
    (["--zero_stage", "2"], ["parallel.pp=2"], ["zero_stage=2 cannot be combined with pp=2",
                                                 "parallel.zero_stage=2 came from accelerate zero_stage=2"]),
    (["--offload_optimizer_device", "cpu"], [], ["offload_optimizer_device=cpu", "does not offload"]),
])
def test_contradiction_is_refused_in_one_line(recipe, env_of, as_rank, capsys, flags, overrides, expected):
    as_rank(env_of(*DS, *flags))
    line = _refused(capsys, recipe, *overrides)
    for text in expected:
        assert text in line, line


@pytest.mark.parametrize("content,expected", [
    ({"train_batch_size": 64}, ["train_batch_size=64", "global batch size is 8"]),
    ({"train_micro_batch_size_per_gpu": 2}, ["train_micro_batch_size_per_gpu=2", "micro-batch size is 4"]),
    ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3", "parallel.zero_stage=1"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, ["\"optimizer\" section", "train.lr"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, ["offload_optimizer.device"]),
])
def test_deepspeed_file_contradiction_is_refused(recipe, env_of, as_rank, capsys, tmp_path, content, expected):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps(content))
    as_rank(env_of(*DS, "--deepspeed_config_file", str(ds_file)))
    line = _refused(capsys, recipe, "parallel.zero_stage=1")
    for text in [str(ds_file.resolve()), *expected]:
        assert text in line, line


def test_two_accelerate_settings_that_disagree(recipe, env_of, as_rank, capsys, tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    as_rank(env_of(*DS, "--zero_stage", "2", "--deepspeed_config_file", str(ds_file)))
    line = _refused(capsys, recipe)
    assert "settings disagree" in line and "zero_stage=2" in line and "zero_optimization.stage=3" in line


def test_recipe_deepspeed_file_and_accelerate_s_differ(recipe, env_of, as_rank, capsys, tmp_path):
    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    mine.write_text("{}")
    theirs.write_text("{}")
    as_rank(env_of(*DS, "--deepspeed_config_file", str(theirs)))
    line = _refused(capsys, recipe, f"train.deepspeed_config={mine}")
    assert f"deepspeed_config_file={theirs}" in line and f"train.deepspeed_config={mine}" in line


def test_fsdp_under_accelerate_is_refused(recipe, env_of, as_rank, capsys):
    env = env_of("--use_fsdp", "--num_processes", "2", "--main_process_port", "0")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    as_rank(env)
    assert "does not run under FSDP" in _refused(capsys, recipe)


@pytest.mark.parametrize("fields,overrides,expected", [
    ({"deepspeed_config": {"zero_stage": 3}}, ["parallel.zero_stage=1"],
     ["deepspeed_config.zero_stage=3", "contradicts parallel.zero_stage=1"]),
    # accelerate itself refuses fp8 at launch where no fp8 library is installed; a file can still ask for it.
    ({"mixed_precision": "fp8"}, [], ["mixed_precision=fp8", "not fp8"]),
    ({"dynamo_config": {"dynamo_backend": "INDUCTOR"}}, [], ["dynamo_backend=INDUCTOR", "torch.compile"]),
    ({"distributed_type": "MEGATRON_LM"}, [], ["distributed_type=MEGATRON_LM", "Megatron-LM"]),
])
def test_config_file_refusal_through_gptdist_check(recipe, tmp_path, capsys, fields, overrides, expected):
    """gptdist's launchers run `gptdist check --accelerate-config F` before starting anything."""
    file = accelerate_yaml(tmp_path / "acc.yaml", **fields)
    code = main(["check", str(recipe), *overrides, "--world", "2", "--accelerate-config", str(file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for text in [f"accelerate config {file}: ", *expected]:
        assert text in err[0], err[0]


# ------------------------------------------------------------------------------------ launcher mistakes


def test_cpu_flag_starts_one_rankless_process(recipe, env_of, as_rank, capsys):
    env = env_of("--cpu", "--num_processes", "2")
    assert "RANK" not in env and env["ACCELERATE_USE_CPU"] == "True"
    as_rank(env)
    line = _refused(capsys, recipe)
    assert "--cpu starts one process with no rank" in line and "--use_deepspeed --num_processes N" in line


def test_several_processes_without_a_multi_process_launcher(recipe, env_of, as_rank, capsys):
    env = env_of("--num_processes", "2", "--main_process_port", "29555")  # no --use_deepspeed, no GPUs
    assert "RANK" not in env and "MASTER_PORT" in env
    as_rank(env)
    assert "add --use_deepspeed" in _refused(capsys, recipe)


def test_non_standard_multinode_launcher_and_its_local_rank(recipe, env_of, as_rank, capsys, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    env = env_of("--use_deepspeed", "--num_machines", "2", "--num_processes", "4", "--machine_rank", "0",
                 "--main_process_ip", "127.0.0.1", "--main_process_port", "29556",
                 "--deepspeed_multinode_launcher", "nossh", "--deepspeed_hostfile", str(hostfile))
    as_rank(env)
    line = _refused(capsys, recipe, before=["--local_rank=0"])  # where the deepspeed launcher puts it under nossh
    assert "through the deepspeed launcher" in line and "--local_rank=0" in line and ".deepspeed_env" in line
    assert "--deepspeed_multinode_launcher standard" in line


def test_local_rank_is_checked_against_the_environment(recipe, as_rank, capsys):
    as_rank({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "CROSS_RANK": "0"})
    line = _refused(capsys, recipe, before=["--local_rank=1"])
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


# ------------------------------------------------------------------------------------ the config file as a node layout


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
