#!/usr/bin/env bash
# Train on this node with the deepspeed launcher.
#   launch/train.sh [--accelerate-config FILE] CONFIG [key=value ...]
# GPUS_PER_NODE=N sets the number of ranks (default: every GPU, or 2 CPU ranks where there is none).
# MASTER_PORT picks the rendezvous port (default: a free one, so two jobs on one node do not clash).
# --accelerate-config FILE: an accelerate config YAML gives those two when unset (num_processes, main_process_port)
# and its training settings to the ranks (gptdist/launchers/accelerate_config.py).
set -euo pipefail
usage() { echo "usage: launch/train.sh [--accelerate-config FILE] CONFIG [key=value ...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

accelerate_args=()
if [[ "$1" == --accelerate-config ]]; then
  [[ $# -ge 3 ]] || usage
  gptdist_accelerate_layout one-node "$2"
  accelerate_args=(--accelerate-config "$GPTDIST_ACCELERATE_CONFIG")
  shift 2
fi

gptdist_lift_credentials "$@"
set -- "${gptdist_args[@]}"
ranks="${GPUS_PER_NODE:-$(gptdist_local_gpus)}"
if [[ "$ranks" == 0 ]]; then
  ranks=2
fi
gptdist_number train.sh GPUS_PER_NODE "$ranks" 1 100000
gptdist_cpu_env "$ranks"
port="${MASTER_PORT:-$(gptdist_free_port)}"
gptdist_number train.sh MASTER_PORT "$port" 1 65535

# Refuse a bad config or layout once, here, instead of once per rank after the launcher has started them all.
python -m gptdist.cli check "$@" "${accelerate_args[@]}" --world "$ranks"

deepspeed --log_level warning --num_gpus "$ranks" --master_port "$port" --no_local_rank --module gptdist.cli train "$@" "${accelerate_args[@]}" &
gptdist_forward_stop_signals $!
