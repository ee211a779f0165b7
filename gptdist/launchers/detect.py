"""Which launcher started this rank, from the variables each one exports (recorded in the MLflow run)."""

from __future__ import annotations

from typing import Mapping

from gptdist.launchers.accelerate_env import under_accelerate


def launcher_name(env: Mapping[str, str]) -> str:
    """'accelerate', 'deepspeed', 'torchrun', 'slurm' (srun with one task per rank) or 'none' (started alone)."""
    if under_accelerate(env):
        return "accelerate"
    if "CROSS_RANK" in env:  # deepspeed.launcher.launch, also under launch/*.sh and slurm/train.sbatch
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_PROCID" in env:
        return "slurm"
    return "none"
