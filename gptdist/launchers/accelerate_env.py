"""The environment of a rank started by `accelerate launch`.

accelerate's one-node path and its `--deepspeed_multinode_launcher standard` path start the ranks through torchrun,
which exports RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT: all gptdist needs, since it builds its DeepSpeed
engine itself. accelerate's Accelerator and PartialState objects are never created in a rank: under DeepSpeed on
CPU they report every rank as process 0 of 1, and they know no pipeline parallelism.

Two other paths start ranks gptdist cannot use; they are refused here in one line, before any process group exists,
so that no rank is left waiting for another:
  - `--cpu` (and, on a machine without GPUs, a launch without --use_deepspeed or --multi_gpu) runs accelerate's
    one-process launcher: one process with no rank, whatever --num_processes says;
  - `--deepspeed_multinode_launcher pdsh | nossh | openmpi | ...` goes through the deepspeed launcher: accelerate
    appends its whole environment to ./.deepspeed_env on every launch (later launches ship that file's variables to
    every node), and nossh appends --local_rank=N to gptdist's arguments.
The settings accelerate exports (ACCELERATE_DEEPSPEED_ZERO_STAGE, ...) are mapped in accelerate_settings.py.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

from gptdist.errors import UserError
from gptdist.launchers.accelerate_settings import Setting, settings_from_accelerate

# accelerate's name of a setting -> the variable `accelerate launch` exports it in.
ENV_NAMES = {
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "mixed_precision": "ACCELERATE_MIXED_PRECISION",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "dynamo_backend": "ACCELERATE_DYNAMO_BACKEND",
}
# accelerate --use_fsdp etc. run torchrun too, with one of these set.
_OTHER_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_MEGATRON_LM": "MEGATRON_LM",
                  "ACCELERATE_USE_PARALLELISM_CONFIG": "PARALLELISM_CONFIG"}


def under_accelerate(env: Mapping[str, str]) -> bool:
    # Every one of accelerate's launchers exports the mixed-precision choice; the DeepSpeed path also says so.
    return "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_DEEPSPEED" in env


def _true(text: Optional[str]) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes")


def check_launch(env: Mapping[str, str], local_rank_arg: Optional[int]) -> None:
    """Refuse the accelerate launches whose ranks cannot train together (see the module docstring)."""
    if "RANK" not in env:
        if _true(env.get("ACCELERATE_USE_CPU")):
            raise UserError("accelerate launch --cpu starts one process with no rank, whatever --num_processes says "
                            "(and gptdist runs on the CPU by itself where there is no GPU): drop --cpu and launch "
                            "with --use_deepspeed --num_processes N")
        if "MASTER_PORT" in env:
            # accelerate's one-process launcher sets MASTER_ADDR/PORT only when asked for several processes.
            raise UserError("accelerate launch started one process with no rank although it was asked for several "
                            "(without --use_deepspeed or --multi_gpu, and without GPUs, it runs its one-process "
                            "launcher): add --use_deepspeed so that torchrun starts every rank")
        return  # a world of one, as `gptdist train` alone
    if "CROSS_RANK" in env:  # exported by deepspeed's own per-node launcher, never by torchrun
        got = f" (it passed --local_rank={local_rank_arg})" if local_rank_arg is not None else ""
        raise UserError("accelerate launch started this rank through the deepspeed launcher "
                        f"(--deepspeed_multinode_launcher pdsh, nossh, ...){got}, which gptdist does not support: it "
                        "appends the whole environment to ./.deepspeed_env on every launch (delete that file); use "
                        "--deepspeed_multinode_launcher standard --same_network with --machine_rank on every node, "
                        "or launch/hostfile.sh")


def settings_from_env(env: Mapping[str, str]) -> List[Setting]:
    """The settings `accelerate launch` exported, in gptdist's terms (accelerate_settings.py)."""
    # Under --use_deepspeed accelerate lists which of them came from its config file rather than the command line.
    from_file = {name.strip() for name in env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if name.strip()}
    values = {name: env.get(var) for name, var in ENV_NAMES.items()}
    for var, engine in _OTHER_ENGINES.items():
        if _true(env.get(var)):
            values["distributed_type"] = engine

    def describe(name: str, value) -> str:
        if name == "distributed_type":
            return f"accelerate launch with {next(v for v, e in _OTHER_ENGINES.items() if e == value)}=true"
        where = ", from its config file" if name in from_file else ""
        return f"accelerate {name}={value} ({ENV_NAMES[name]}{where})"

    return settings_from_accelerate(values, describe, precision_is_explicit="mixed_precision" in from_file)
