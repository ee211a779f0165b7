"""An accelerate config YAML (what `accelerate config` writes), read with accelerate's own loader.

gptdist's launchers take the node layout from one (`launch/train.sh | node.sh | hostfile.sh | accelerate.sh
--accelerate-config FILE CONFIG ...`):

    num_machines                        NUM_NODES
    num_processes (over all machines)   GPUS_PER_NODE = num_processes / num_machines
    machine_rank                        NODE_RANK
    main_process_ip, main_process_port  MASTER_ADDR, MASTER_PORT
    deepspeed_config.deepspeed_hostfile the hostfile of launch/hostfile.sh (and the node names of node.sh, which are
                                        otherwise labels: without ssh deepspeed only numbers the nodes by them)

A variable already set in the environment wins, as accelerate's command-line flags win over its file (so one file
serves every node, each with its own NODE_RANK). The ranks are given `--accelerate-config FILE` too and take its
training settings (zero_stage, mixed_precision, ...) exactly as they take them from `accelerate launch`.

    python -m gptdist.launchers.accelerate_config --for one-node|node|hostfile [FILE]
        prints `export VAR=value` lines for the launcher to eval (without FILE: from accelerate's default config
        file, or only GPTDIST_ACCELERATE_CONFIG='' when there is none); a bad file: one line and exit status 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gptdist.errors import UserError
from gptdist.launchers.accelerate_settings import Setting, settings_from_accelerate

# Where each setting sits in the file, by accelerate's name for it.
_FILE_PLACES = {
    "zero_stage": "deepspeed_config.zero_stage",
    "gradient_clipping": "deepspeed_config.gradient_clipping",
    "gradient_accumulation_steps": "deepspeed_config.gradient_accumulation_steps",
    "deepspeed_config_file": "deepspeed_config.deepspeed_config_file",
    "offload_optimizer_device": "deepspeed_config.offload_optimizer_device",
    "offload_param_device": "deepspeed_config.offload_param_device",
    "mixed_precision": "mixed_precision",
    "dynamo_backend": "dynamo_config.dynamo_backend",
    "distributed_type": "distributed_type",
}


def load(path: str):
    """accelerate's ClusterConfig for PATH; every way the file can be wrong becomes one line."""
    # accelerate: slow to import, only when an accelerate config is read
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    if not Path(path).is_file():
        raise UserError(f"accelerate config {path} not found: pass the YAML that `accelerate config` wrote "
                        "(by default $HF_HOME/accelerate/default_config.yaml)")
    try:
        config = load_config_from_file(path)
    except Exception as exc:  # noqa: BLE001 - YAML errors, unknown keys, bad enum values: all the user's file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"accelerate config {path} cannot be read by accelerate: {first}") from None
    if not isinstance(config, ClusterConfig):
        raise UserError(f"accelerate config {path} is for {config.compute_environment.value}; gptdist's launchers "
                        "need a LOCAL_MACHINE config (num_machines, num_processes, machine_rank, ...)")
    return config


def settings(config, path: str) -> List[Setting]:
    """The file's training settings, in gptdist's terms (accelerate_settings.py)."""
    ds = config.deepspeed_config or {}
    values = {name: ds.get(name) for name in _FILE_PLACES if _FILE_PLACES[name].startswith("deepspeed_config.")}
    values["mixed_precision"] = config.mixed_precision
    values["dynamo_backend"] = (config.dynamo_config or {}).get("dynamo_backend")
    values["distributed_type"] = getattr(config.distributed_type, "value", config.distributed_type)

    def describe(name: str, value) -> str:
        return f"accelerate config {path}: {_FILE_PLACES[name]}={value}"

    # In a file, mixed_precision 'no' is a choice (fp32), not the absence of one.
    return settings_from_accelerate(values, describe, precision_is_explicit=True)


def node_layout(config, path: str, launcher: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The launcher variables the file sets (those not already in the environment) and the ones only the launcher
    script itself reads, checked for what that launcher can start."""
    machines = int(config.num_machines or 1)
    processes = int(config.num_processes) if config.num_processes not in (None, -1) else None
    rank = int(config.machine_rank or 0)
    where = f"accelerate config {path}"
    if machines < 1:
        raise UserError(f"{where}: num_machines={machines} must be at least 1")
    if processes is not None and (processes < 1 or processes % machines):
        raise UserError(f"{where}: num_processes={processes} is not a positive multiple of num_machines={machines} "
                        "(accelerate counts the processes of all machines together)")
    if not 0 <= rank < machines:
        raise UserError(f"{where}: machine_rank={rank} is not in 0..{machines - 1}")
    hostfile = (config.deepspeed_config or {}).get("deepspeed_hostfile")
    if launcher == "one-node" and machines > 1:
        raise UserError(f"{where}: num_machines={machines}, but launch/train.sh starts one node: run launch/node.sh "
                        "or launch/accelerate.sh on every node, or launch/hostfile.sh")
    if launcher == "hostfile" and not hostfile:
        raise UserError(f"{where}: no deepspeed_config.deepspeed_hostfile: launch/hostfile.sh needs the nodes' "
                        "hostfile")
    if machines > 1 and launcher == "node" and not config.main_process_ip:
        raise UserError(f"{where}: num_machines={machines} needs main_process_ip, the address of machine 0")

    out: Dict[str, str] = {}
    if processes is not None:
        out["GPUS_PER_NODE"] = str(processes // machines)
    if config.main_process_port:
        out["MASTER_PORT"] = str(config.main_process_port)
    if launcher != "one-node" and config.main_process_ip:
        out["MASTER_ADDR"] = str(config.main_process_ip)
    if launcher == "node":
        out.update(NUM_NODES=str(machines), NODE_RANK=str(rank))
        if hostfile:
            out["NODE_HOSTS"] = " ".join(_hostfile_names(hostfile, where))
        elif machines > 1:
            # Without ssh the deepspeed launcher uses node names only to number the ranks: labels will do.
            out["NODE_HOSTS"] = " ".join(f"machine{i}" for i in range(machines))
    own = {"GPTDIST_ACCELERATE_CONFIG": str(Path(path).resolve())}
    if launcher == "hostfile":
        own["GPTDIST_ACCELERATE_HOSTFILE"] = str(hostfile)
        if processes is not None:
            own["GPTDIST_ACCELERATE_PROCESSES"] = str(processes)
    return {k: v for k, v in out.items() if k not in os.environ}, own


def _hostfile_names(hostfile: str, where: str) -> List[str]:
    """The host names of a deepspeed hostfile, in order: its first word per line (launch/hostfile.sh validates the
    rest of each line)."""
    file = Path(hostfile)
    if not file.is_file():
        raise UserError(f"{where}: deepspeed_config.deepspeed_hostfile={hostfile} not found")
    names = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            names.append(words[0])
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptdist.launchers.accelerate_config",
                                     description="Print the node layout of an accelerate config file as shell lines.")
    parser.add_argument("--for", dest="launcher", choices=("one-node", "node", "hostfile"), required=True)
    parser.add_argument("file", nargs="?", help="default: accelerate's own default config file, if there is one")
    args = parser.parse_args(argv)
    if args.file is None:
        # What `accelerate launch` reads when given no --config_file: its default file ($HF_HOME/accelerate/...).
        from accelerate.commands.config.config_args import default_config_file

        if not Path(default_config_file).is_file():
            print("GPTDIST_ACCELERATE_CONFIG=''")
            return 0
        args.file = default_config_file
    try:
        config = load(args.file)
        settings(config, args.file)  # refuse a file whose settings gptdist cannot honour before anything starts
        exported, own = node_layout(config, args.file, args.launcher)
    except UserError as err:
        print(f"gptdist: {err}", file=sys.stderr)
        return UserError.exit_code
    for key, value in exported.items():
        print(f"export {key}={shlex.quote(value)}")
    for key, value in own.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
