"""Shared by the accelerate tests: recipes that leave accelerate's settings open, accelerate config files, and the
environment `accelerate launch` gives its ranks, computed by accelerate's own launch code (no processes started).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import yaml

from tests.helpers import ROOT, cpu_env, write_recipe

# The variables a launcher sets in a rank; cleared before a test sets its own.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")


def open_recipe(path: Path, corpus, tokenizer, run_dir: Path, unset: Iterable[str] = ("parallel.zero_stage",),
                **sections) -> Path:
    """tests.helpers.write_recipe without the keys in `unset` (dotted), so that accelerate's settings may fill them."""
    write_recipe(path, corpus, tokenizer, run_dir, **sections)
    recipe = yaml.safe_load(path.read_text())
    for key in unset:
        section, field = key.split(".")
        recipe.get(section, {}).pop(field, None)
    path.write_text(yaml.safe_dump(recipe))
    return path


def accelerate_yaml(path: Path, **fields) -> Path:
    """An accelerate config file like the ones `accelerate config` writes for DeepSpeed on one machine; FIELDS
    replace its values (a dict is merged into the one there; None removes a key, also inside such a dict)."""
    config = {"compute_environment": "LOCAL_MACHINE", "debug": False, "distributed_type": "DEEPSPEED",
              "downcast_bf16": "no", "machine_rank": 0, "main_training_function": "main", "mixed_precision": "no",
              "num_machines": 1, "num_processes": 2, "rdzv_backend": "static", "same_network": True, "tpu_env": [],
              "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": False,
              "deepspeed_config": {"gradient_accumulation_steps": 1, "offload_optimizer_device": "none",
                                   "offload_param_device": "none", "zero3_init_flag": False, "zero_stage": 2}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merged = {**config[key], **value}
            config[key] = {k: v for k, v in merged.items() if v is not None}
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def rank_environment(flags: Sequence[str], no_default_config: Path) -> Dict[str, str]:
    """What a rank of `accelerate launch FLAGS -m gptdist.cli ...` finds in its environment, from accelerate's own
    functions: its argument parser, its validation (which reads --config_file), the launcher it would choose and that
    launcher's environment; then the rank variables torchrun (or, for the non-standard multi-node launchers, the
    deepspeed launcher) adds. Only the variables accelerate adds or changes are returned, with the rank's."""
    from accelerate.commands import launch as accelerate_launch
    from accelerate.utils import launch as accelerate_utils

    # Never a personal default config from this machine: accelerate looks for it when --config_file is absent.
    saved = accelerate_launch.default_config_file
    accelerate_launch.default_config_file = str(no_default_config)
    try:
        args = accelerate_launch.launch_command_parser().parse_args([*flags, "-m", "gptdist.cli"])
        args, defaults, mp_from_config = accelerate_launch._validate_launch_command(args)
    finally:
        accelerate_launch.default_config_file = saved
    rank: Dict[str, str] = {}
    # The same choice as accelerate.commands.launch.launch_command.
    if args.use_deepspeed and not args.cpu:
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        if mp_from_config:
            fields.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = accelerate_utils.prepare_deepspeed_cmd_env(args)
        if args.num_machines > 1 and args.deepspeed_multinode_launcher != "standard":
            rank = {"RANK": "0", "WORLD_SIZE": str(args.num_processes), "LOCAL_RANK": "0", "CROSS_RANK": "0",
                    "CROSS_SIZE": str(args.num_machines), "LOCAL_SIZE": str(args.num_processes // args.num_machines)}
        else:
            rank = {"RANK": "0", "WORLD_SIZE": str(args.num_processes), "LOCAL_RANK": "0",
                    "LOCAL_WORLD_SIZE": str(args.num_processes // args.num_machines), "TORCHELASTIC_RUN_ID": "none"}
    elif args.multi_gpu or args.use_fsdp or args.use_megatron_lm:
        env = accelerate_utils.prepare_multi_gpu_env(args)
        rank = {"RANK": "0", "WORLD_SIZE": str(args.num_processes), "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "none"}
    else:
        _, env = accelerate_utils.prepare_simple_launcher_cmd_env(args)
    added = {k: v for k, v in env.items() if os.environ.get(k) != v and k != "PYTHONPATH"}
    return {**added, **rank}


def accelerate_launch(flags: Sequence[str], recipe: Path, overrides: Sequence[str] = (), hf_home: Optional[Path] = None,
                      cwd: Path = ROOT, timeout: float = 900, env: Optional[Dict[str, str]] = None,
                      wait: bool = True):
    """The real `accelerate launch FLAGS -m gptdist.cli train RECIPE ...`, with accelerate's config home in HF_HOME
    (a temporary folder: no personal default config is read). Returns the finished process, or the Popen."""
    run_env = cpu_env({"HF_HOME": str(hf_home), **(env or {})})
    # The ranks import gptdist from this checkout, wherever the launch runs.
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), run_env.get("PYTHONPATH", "")) if p)
    cmd = ["accelerate", "launch", *flags, "-m", "gptdist.cli", "train", str(recipe), *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=run_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout)


DS = ["--use_deepspeed", "--num_processes", "2", "--main_process_port", "0"]


def refused(capsys, recipe: Path, *args: str, before=()) -> str:
    """`gptdist [BEFORE] train RECIPE ARGS` in this process (the same main() a rank runs): exit 2 and one line."""
    from gptdist.cli import main

    code = main([*before, "train", str(recipe), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gptdist: ")
    return lines[0]
