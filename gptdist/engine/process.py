"""Where this process stands in the job, and the setup every rank does before DeepSpeed is imported.

A rank learns its place from the environment that its launcher exports: the deepspeed launcher and torchrun set
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under `srun` without them we map SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. A
process started alone (`gptdist train cfg.yaml` in a shell) becomes a world of one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gptdist.engine.ds_config import resolve_precision
from gptdist.engine.shm import clear_stale_shm, disable_shm_op
from gptdist.errors import UserError, env_int
from gptdist.parallel.layout import Layout
from gptdist.parallel.topology import Topology


@dataclass(frozen=True)
class World:
    """This process's rank in the job, the job's size, and the same on this node."""

    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def discover_world() -> World:
    """Read (and where missing, fill in) the torch.distributed environment variables."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # srun with one task per rank: Slurm knows the place, torch.distributed wants its own names.
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "SLURM_NTASKS_PER_NODE" in env:
            env.setdefault("LOCAL_WORLD_SIZE", env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    world = env_int(env, "WORLD_SIZE", minimum=1)
    rank = env_int(env, "RANK")
    # The deepspeed launcher exports LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE; a single node otherwise.
    local_name = "LOCAL_WORLD_SIZE" if env.get("LOCAL_WORLD_SIZE") else "LOCAL_SIZE"
    local_world = env_int(env, local_name, default=world, minimum=1)
    local_rank = env_int(env, "LOCAL_RANK", default=0)
    if rank >= world or local_rank >= local_world:
        which, value, size = ("RANK", rank, world) if rank >= world else ("LOCAL_RANK", local_rank, local_world)
        raise UserError(f"{which}={value} in the environment is not below the size {size} the launcher gave "
                        "(WORLD_SIZE / LOCAL_WORLD_SIZE); fix or unset them")
    return World(rank, world, local_rank, local_world)


def keep_mlflow_out() -> None:
    """For ranks that do not track: `import deepspeed` imports mlflow when it is installed (its autotuner, which
    gptdist never runs, probes for it), 2-3 s per process on a small machine. Blocking the import makes that probe
    fail at once; only the tracking rank (rank 0 with tracking enabled) imports mlflow."""
    sys.modules.setdefault("mlflow", None)  # type: ignore[arg-type]  # None in sys.modules: ImportError


def prepare_process(world: World) -> str:
    """Choose the accelerator and share the CPU fairly, before torch's thread pools and DeepSpeed start.

    Returns the device type, 'cuda' or 'cpu'.
    """
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", device_type)
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
        # TF32 tensor cores for whatever runs in fp32 (bf16 autocast covers the rest): ~8x the fp32 matmul rate on
        # A100/H100 with a 10-bit mantissa, which pre-training tolerates.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:
        # Several CPU ranks on one node with default threads oversubscribe the cores badly (10x slower seen at
        # 8 ranks on 2 cores): give each rank its share.
        share = max(1, (os.cpu_count() or 1) // max(1, world.local_size))
        torch.set_num_threads(share)
    if world.local_size > 1:
        # Each rank tokenizes its own stream; Rust thread pools per rank would fight over the same cores.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return device_type


@dataclass(frozen=True)
class Rank:
    """A started rank: its place in the job and in the layout's grid, its device and its training precision."""

    world: World
    device_type: str  # "cuda" | "cpu"
    precision: str  # "fp32" | "bf16" | "fp16"
    topology: Topology

    @property
    def layout(self) -> Layout:
        return self.topology.layout

    def checkpoint_state(self) -> dict:
        """What a checkpoint records of this rank's place: the layout it was written in (same_layout on resume)."""
        return {"layout": self.layout.record()}

    @property
    def device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")


def start_rank(cfg, world: World, layout: Layout, timeout_s: float = 600) -> Rank:
    """Everything a rank does before it builds its model, in this order: the device and its threads (before torch's
    pools and DeepSpeed start), the precision, quiet logs on ranks other than 0, the process group, the topology's
    groups. `gptdist train` and `gptdist bench train` both start here."""
    device_type = prepare_process(world)
    precision = resolve_precision(cfg, device_type)
    quiet_warnings(world.is_main)
    init_process_group(device_type, timeout_s=timeout_s)
    quiet_deepspeed(world.is_main)
    return Rank(world, device_type, precision, Topology(layout, world.rank))


def quiet_warnings(is_main: bool) -> None:
    if not is_main:
        warnings.filterwarnings("ignore")
    # torch.distributed's deprecation notices are about DeepSpeed's calls, not anything a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # The pipeline engine passes activations between stages with broadcasts inside autograd; torch warns that
    # broadcast has no autograd kernel, but DeepSpeed sends the gradients back itself.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel")


def quiet_deepspeed(is_main: bool) -> None:
    """DeepSpeed logs its set-up at INFO from every rank; keep rank 0's warnings and silence the rest."""
    # deepspeed: slow to import, only when a rank starts
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING if is_main else logging.ERROR)


def init_process_group(device_type: str, timeout_s: float) -> None:
    # deepspeed: slow to import, only when a rank starts
    import deepspeed

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cpu":
        disable_shm_op()  # its /dev/shm buffers leaked, and it compiled at run time, for an inference-only path
        clear_stale_shm()  # what killed runs of other DeepSpeed programs left on this node
    # DeepSpeed prints a line per rank as it loads its communication op; errors still raise.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))


def finish_process(exit_code: int) -> None:
    """End a rank without the interpreter's teardown.

    After training, gloo's threads sometimes abort the process during interpreter shutdown ("terminate called
    without an active exception"), turning a finished run into a failed exit. Everything that matters is written
    and closed before this is called, so we leave the process group and exit directly.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the run is already complete; a teardown error must not fail it
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
