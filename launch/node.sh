#!/usr/bin/env bash
# This node's share of a multi-node run: one deepspeed launcher per node, started by you or by srun, no ssh.
#   launch/node.sh CONFIG [key=value ...]
# Every node runs the same command with its own NODE_RANK:
#   NODE_RANK     this node's index, 0..NUM_NODES-1          (default: $SLURM_NODEID, else 0)
#   NUM_NODES     number of nodes                            (default: $SLURM_JOB_NUM_NODES, else 1)
#   NODE_HOSTS    the nodes' names, in node-rank order       (default: `scontrol show hostnames`, else localhost)
#   MASTER_ADDR   address of node 0                          (default: the first of NODE_HOSTS)
#   MASTER_PORT   rendezvous port, the same on every node    (default: derived from $SLURM_JOB_ID, so that jobs
#                                                             sharing a node differ; a free port on one node)
#   GPUS_PER_NODE ranks on this node                         (default: every GPU, or 2 CPU ranks where there is none)
#   GPTDIST_SKIP_CHECK=1  skip `gptdist check` (the caller has already checked the config for the whole world)
# SIGTERM, SIGINT and SIGUSR1 ask this node's ranks to save a checkpoint and exit, as with launch/train.sh.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: [NODE_RANK=R NUM_NODES=N NODE_HOSTS='h0 h1 ..' MASTER_ADDR=A MASTER_PORT=P] launch/node.sh CONFIG [key=value ...]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

fail() { echo "node.sh: $*" >&2; exit 2; }
# A stop request (USR1 to the whole job step) that comes while this node is still setting up must not kill it.
trap '' USR1

node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
num_nodes="${NUM_NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
ranks="${GPUS_PER_NODE:-$(gptdist_local_gpus)}"
if [[ "$ranks" == 0 ]]; then
  ranks=2
fi

if [[ -n "${NODE_HOSTS:-}" ]]; then
  read -r -a hosts <<< "${NODE_HOSTS//,/ }"
elif [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif [[ "$num_nodes" == 1 ]]; then
  hosts=(localhost)
else
  fail "NUM_NODES=$num_nodes but no NODE_HOSTS: set NODE_HOSTS to the nodes' names in node-rank order"
fi
[[ "$num_nodes" =~ ^[1-9][0-9]*$ ]] || fail "NUM_NODES=$num_nodes is not a positive number"
[[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$num_nodes" ]] || fail "NODE_RANK=$node_rank is not in 0..$((num_nodes - 1))"
# The launcher silently drops hosts beyond --num_nodes and refuses duplicates; say so plainly instead.
[[ "${#hosts[@]}" -ge "$num_nodes" ]] || fail "NUM_NODES=$num_nodes but only ${#hosts[@]} host(s) given: ${hosts[*]}"
hosts=("${hosts[@]:0:$num_nodes}")
if [[ "$(printf '%s\n' "${hosts[@]}" | sort -u | wc -l)" -ne "$num_nodes" ]]; then
  fail "the node names must be distinct (deepspeed keys the nodes by name): ${hosts[*]}"
fi

master_addr="${MASTER_ADDR:-${hosts[0]}}"
if [[ -n "${MASTER_PORT:-}" ]]; then
  master_port="$MASTER_PORT"
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # Every node computes the same port with no communication; two jobs on one node (or a job and its requeued
  # self, whose old sockets may linger) get different ones.
  master_port=$((20000 + (SLURM_JOB_ID % 3000) * 10 + ${SLURM_RESTART_COUNT:-0} % 10))
elif [[ "$num_nodes" == 1 ]]; then
  master_port="$(gptdist_free_port)"
else
  fail "set MASTER_PORT: every node must use the same rendezvous port"
fi

gptdist_cpu_env "$ranks"
if [[ "${GPTDIST_SKIP_CHECK:-0}" != 1 ]]; then
  python -m gptdist.cli check "$@" --world $((num_nodes * ranks))
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
    --no_local_rank --module gptdist.cli train "$@"
) &
gptdist_forward_stop_signals $!
