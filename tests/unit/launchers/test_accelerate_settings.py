"""accelerate's settings in gptdist's terms, without starting any process.

The environment a rank would get is computed by accelerate's own launch code from real `accelerate launch` flags and
config files (tests/accelerate_helpers.py); the config files are read by accelerate's own loader. Then gptdist's
mapping: a setting the recipe leaves open is taken, one it contradicts is refused with exit status 2 and one line
naming both values, and so is each launcher mistake.
"""

from __future__ import annotations

import json

import pytest

from gptdist.cli import main
from gptdist.engine.ds_config import build_ds_config
from gptdist.launchers.run_config import resolve_run_config
from gptdist.parallel.layout import Layout
from tests.accelerate_helpers import DS, accelerate_yaml, refused

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
    line = refused(capsys, recipe, *overrides)
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
    line = refused(capsys, recipe, "parallel.zero_stage=1")
    for text in [str(ds_file.resolve()), *expected]:
        assert text in line, line


def test_two_accelerate_settings_that_disagree(recipe, env_of, as_rank, capsys, tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    as_rank(env_of(*DS, "--zero_stage", "2", "--deepspeed_config_file", str(ds_file)))
    line = refused(capsys, recipe)
    assert "settings disagree" in line and "zero_stage=2" in line and "zero_optimization.stage=3" in line


def test_recipe_deepspeed_file_and_accelerate_s_differ(recipe, env_of, as_rank, capsys, tmp_path):
    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    mine.write_text("{}")
    theirs.write_text("{}")
    as_rank(env_of(*DS, "--deepspeed_config_file", str(theirs)))
    line = refused(capsys, recipe, f"train.deepspeed_config={mine}")
    assert f"deepspeed_config_file={theirs}" in line and f"train.deepspeed_config={mine}" in line


def test_fsdp_under_accelerate_is_refused(recipe, env_of, as_rank, capsys):
    env = env_of("--use_fsdp", "--num_processes", "2", "--main_process_port", "0")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    as_rank(env)
    assert "does not run under FSDP" in refused(capsys, recipe)


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














# ------------------------------------------------------------------------------------ the config file as a node layout












