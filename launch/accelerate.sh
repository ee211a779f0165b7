#!/usr/bin/env bash
# This node's share of a run whose ranks `accelerate launch` starts (torchrun underneath), by you or by srun.
#   launch/accelerate.sh [--accelerate-config FILE] CONFIG [key=value ...]
# The same variables as launch/node.sh, with the same defaults (Slurm's where set): NODE_RANK, NUM_NODES,
# MASTER_ADDR (default: the first of NODE_HOSTS), MASTER_PORT, GPUS_PER_NODE, GPTDIST_SKIP_CHECK=1. An accelerate
# config FILE gives those not set (num_machines, num_processes / num_machines, machine_rank, main_process_ip/port)
# and is passed to accelerate, whose settings (zero_stage, mixed_precision, ...) the ranks then honour. Without
# FILE, accelerate's default config ($HF_HOME/accelerate/default_config.yaml) is used the same way if it exists.
# What it adds to a bare `accelerate launch`: the recipe and accelerate's settings are checked once for the whole
# world before anything starts (one line, exit status 2), every node gets --machine_rank, --same_network and the
# `standard` launcher (the paths that work, see docs/cluster.md), and SIGTERM, SIGINT and SIGUSR1 ask this node's
# ranks to save a checkpoint and exit, as with launch/node.sh, instead of torchrun killing them mid-save.
set -euo pipefail
usage() {
  echo "usage: [NODE_RANK=R NUM_NODES=N MASTER_ADDR=A MASTER_PORT=P] launch/accelerate.sh [--accelerate-config FILE]" \
       "CONFIG [key=value ...]" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

# A stop request (USR1 to the whole job step) that comes while this node is still setting up must not kill it.
trap '' USR1
command -v accelerate >/dev/null || { echo "accelerate.sh: accelerate not found: bash launch/setup.sh installs it" >&2; exit 2; }

if [[ "$1" == --accelerate-config ]]; then
  [[ $# -ge 3 ]] || usage
  gptdist_accelerate_layout node "$2"
  shift 2
else
  gptdist_accelerate_layout node  # accelerate reads its default config file when given none: so do we
fi
accelerate_args=()
check_args=()
if [[ -n "$GPTDIST_ACCELERATE_CONFIG" ]]; then
  accelerate_args=(--config_file "$GPTDIST_ACCELERATE_CONFIG")
  check_args=(--accelerate-config "$GPTDIST_ACCELERATE_CONFIG")
else
  # No file: accelerate's defaults, said out loud (otherwise it prints a warning listing them).
  accelerate_args=(--mixed_precision no)
fi
gptdist_lift_credentials "$@"
set -- "${gptdist_args[@]}"
gptdist_node_layout accelerate.sh no

gptdist_cpu_env "$ranks"
if [[ "${GPTDIST_SKIP_CHECK:-0}" != 1 ]]; then
  python -m gptdist.cli check "$@" "${check_args[@]}" --world $((num_nodes * ranks))
fi

echo "accelerate.sh: node $node_rank of $num_nodes, $ranks ranks, rendezvous $master_addr:$master_port" >&2
# As in node.sh: the launcher runs with the stop signals ignored, so that a signal to every process of the node (what
# Slurm does to a job step) reaches the ranks without ending the launcher under them. torchrun would otherwise catch
# SIGTERM and SIGINT itself, pass them on, kill the ranks 30 s later whether or not their save is done, and fail; it
# keeps handling SIGHUP and SIGQUIT.
(
  trap '' TERM INT USR1
  export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
  exec accelerate launch "${accelerate_args[@]}" --use_deepspeed --dynamo_backend no \
    --num_machines "$num_nodes" --num_processes $((num_nodes * ranks)) --machine_rank "$node_rank" \
    --main_process_ip "$master_addr" --main_process_port "$master_port" --same_network \
    --deepspeed_multinode_launcher standard --module gptdist.cli train "$@"
) &
gptdist_forward_stop_signals $!
