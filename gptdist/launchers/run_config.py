"""The run config of `gptdist train` and `gptdist check`: the recipe, plus what the launcher passed.

    recipe YAML + key=value overrides                       (gptdist/config.py)
    + accelerate's settings, where the recipe is silent     (`accelerate launch`'s ACCELERATE_* variables, or the
                                                             accelerate config file given by --accelerate-config)
    -> one validated RunConfig, or one line and exit status 2 (a contradiction, a launcher mistake)
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Sequence

from gptdist.config import RunConfig
from gptdist.errors import UserError, env_int
from gptdist.launchers import accelerate_env
from gptdist.launchers.accelerate_settings import Setting, apply_settings


def resolve_run_config(config_path: Optional[str], overrides: Sequence[str], *, env: Mapping[str, str] = os.environ,
                       world_size: Optional[int] = None, accelerate_config: Optional[str] = None,
                       local_rank_arg: Optional[int] = None) -> RunConfig:
    """env: this rank's environment (empty for `gptdist check`, which runs before any launcher);
    world_size: default WORLD_SIZE from env, else 1; local_rank_arg: a --local_rank=N some launcher appended."""
    settings: List[Setting] = []
    if accelerate_env.under_accelerate(env):
        accelerate_env.check_launch(env, local_rank_arg)
        settings += accelerate_env.settings_from_env(env)
    if local_rank_arg is not None and str(local_rank_arg) != env.get("LOCAL_RANK"):
        # The deepspeed launcher without --no_local_rank appends it; harmless when it says what LOCAL_RANK says.
        raise UserError(f"gptdist train got --local_rank={local_rank_arg} but LOCAL_RANK={env.get('LOCAL_RANK')!r}: "
                        "gptdist reads its place from the environment; start the deepspeed launcher with "
                        "--no_local_rank, as launch/train.sh does")
    if accelerate_config is not None:
        # deferred: only with --accelerate-config; `gptdist check` starts without it
        from gptdist.launchers import accelerate_config as config_file

        settings += config_file.settings(config_file.load(accelerate_config), accelerate_config)
    world = world_size if world_size is not None else env_int(env, "WORLD_SIZE", default=1, minimum=1)
    if world < 1:
        raise UserError(f"--world {world}: a run has at least one rank; pass --world N with N >= 1 (the number of "
                        "ranks the run will have)")
    return apply_settings(config_path, overrides, settings, world)
