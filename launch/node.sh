#!/usr/bin/env bash
# This node's share of a multi-node run: one deepspeed launcher per node, started by you or by srun, no ssh.
#   launch/node.sh [--accelerate-config FILE] CONFIG [key=value ...]
# Every node runs the same command with its own NODE_RANK:
#   NODE_RANK     this node's index, 0..NUM_NODES-1          (default: $SLURM_NODEID, else 0)
#   NUM_NODES     number of nodes                            (default: $SLURM_JOB_NUM_NODES, else 1)
#   NODE_HOSTS    the nodes' names, in node-rank order       (default: `scontrol show hostnames`, else localhost)
#   MASTER_ADDR   address of node 0                          (default: the first of NODE_HOSTS)
#   MASTER_PORT   rendezvous port, the same on every node    (default: derived from $SLURM_JOB_ID, so that jobs
#                                                             sharing a node differ; a free port on one node)
#   GPUS_PER_NODE ranks on this node                         (default: every GPU, or 2 CPU ranks where there is none)
#   GPTDIST_SKIP_CHECK=1  skip `gptdist check` (the caller has already checked the config for the whole world)
# --accelerate-config FILE: an accelerate config YAML gives the variables above that are not set (num_machines,
# num_processes / num_machines, machine_rank, main_process_ip/port; node names from its deepspeed_hostfile, else
# labels), and its training settings to the ranks (gptdist/launchers/accelerate_config.py).
# SIGTERM, SIGINT and SIGUSR1 ask this node's ranks to save a checkpoint and exit, as with launch/train.sh.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: [NODE_RANK=R NUM_NODES=N NODE_HOSTS='h0 h1 ..' MASTER_ADDR=A MASTER_PORT=P] launch/node.sh CONFIG [key=value ...]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

# A stop request (USR1 to the whole job step) that comes while this node is still setting up must not kill it.
trap '' USR1

accelerate_args=()
if [[ "$1" == --accelerate-config ]]; then
  [[ $# -ge 3 ]] || { echo "usage: launch/node.sh [--accelerate-config FILE] CONFIG [key=value ...]" >&2; exit 2; }
  gptdist_accelerate_layout node "$2"
  accelerate_args=(--accelerate-config "$GPTDIST_ACCELERATE_CONFIG")
  shift 2
fi
gptdist_lift_credentials "$@"
set -- "${gptdist_args[@]}"
gptdist_node_layout node.sh yes

gptdist_cpu_env "$ranks"
if [[ "${GPTDIST_SKIP_CHECK:-0}" != 1 ]]; then
  python -m gptdist.cli check "$@" "${accelerate_args[@]}" --world $((num_nodes * ranks))
fi

# The launcher wants a hostfile naming every node even without ssh: it numbers the ranks from it.
workdir="$(mktemp -d "${TMPDIR:-/tmp}/gptdist-node.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT
for host in "${hosts[@]}"; do
  echo "$host slots=$ranks"
done > "$workdir/hostfile"

echo "node.sh: node $node_rank of $num_nodes (${hosts[*]}), $ranks ranks, rendezvous $master_addr:$master_port" >&2
# Under srun a signal to the job step reaches every process of it. The launcher processes are started with the stop
# signals ignored (the ranks install their own handlers), so that a stop request saves a checkpoint instead of
# killing the launcher, and with it the ranks. This script forwards the request to the ranks itself.
(
  trap '' TERM INT USR1
  exec deepspeed --log_level warning --no_ssh --node_rank "$node_rank" --num_nodes "$num_nodes" --num_gpus "$ranks" \
    --master_addr "$master_addr" --master_port "$master_port" --hostfile "$workdir/hostfile" \
    --no_local_rank --module gptdist.cli train "$@" "${accelerate_args[@]}"
) &
gptdist_forward_stop_signals $!
