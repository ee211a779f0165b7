#!/usr/bin/env bash
# Train on this node with the deepspeed launcher.
#   launch/train.sh CONFIG [key=value ...]
# GPUS_PER_NODE=N sets the number of ranks (default: every GPU, or 2 CPU ranks where there is none).
# MASTER_PORT picks the rendezvous port (default: a free one, so two jobs on one node do not clash).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: launch/train.sh CONFIG [key=value ...]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

ranks="${GPUS_PER_NODE:-$(gptdist_local_gpus)}"
if [[ "$ranks" == 0 ]]; then
  ranks=2
fi
gptdist_cpu_env "$ranks"
port="${MASTER_PORT:-$(gptdist_free_port)}"

# Refuse a bad config or layout once, here, instead of once per rank after the launcher has started them all.
python -m gptdist.cli check "$@" --world "$ranks"

deepspeed --log_level warning --num_gpus "$ranks" --master_port "$port" --no_local_rank --module gptdist.cli train "$@" &
gptdist_forward_stop_signals $!
