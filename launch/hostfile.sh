#!/usr/bin/env bash
# Train on the nodes of a hostfile from one shell: the deepspeed launcher reaches every node over ssh (pdsh).
#   launch/hostfile.sh HOSTFILE CONFIG [key=value ...]
#   launch/hostfile.sh --accelerate-config FILE CONFIG [key=value ...]
#                                                the hostfile, MASTER_ADDR/PORT and training settings from an accelerate
#                                                config YAML (deepspeed_config.deepspeed_hostfile, main_process_ip/port)
#   launch/hostfile.sh --check HOSTFILE          validate the hostfile only; print its nodes and ranks
# HOSTFILE has one line per node, `host slots=N` (N ranks there, usually its GPUs), in node-rank order:
#   # comments and blank lines are allowed
#   gpu-node-01 slots=8
#   gpu-node-02 slots=8    # a comment after the line too
# Needs passwordless ssh to every node, pdsh here, and this directory and Python environment at the same path on
# every node. MASTER_ADDR (default: the first host's address, asked over ssh), MASTER_PORT (default: a free port
# here), SSH_PORT (default: ssh's own), LAUNCHER (default pdsh; openmpi, mvapich, ... as deepspeed knows them).
# SIGTERM, SIGINT or SIGUSR1 ask the ranks on every node to save a checkpoint and exit (see --stop-ranks below).
# Environment variables reach the remote ranks only if listed in ~/.deepspeed_env or ./.deepspeed_env (KEY=VALUE
# lines; NCCL_*, PYTHON*, MLFLOW* are passed on by the launcher itself).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  echo "usage: launch/hostfile.sh HOSTFILE|--accelerate-config FILE CONFIG [key=value ...] | launch/hostfile.sh --check HOSTFILE" >&2
  exit 2
}

# Reads HOSTFILE; sets `hosts` and `total_slots`, or exits 2 naming the first bad line and what is wrong with it.
# The launcher's own parser accepts some mistakes silently (`slots=4x` as 4, `slots 4` as a bad entry with no line
# number, a host listed twice only after ssh has been tried): catch them all here, before anything starts.
validate_hostfile() {
  local file="$1" n=0 line body host slots rest
  declare -gA seen=()
  hosts=()
  total_slots=0
  [[ -f "$file" ]] || { echo "hostfile.sh: hostfile $file not found" >&2; exit 2; }
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    body="${line%%#*}"                         # a comment runs to the end of the line
    read -r host slots rest <<< "$body" || true
    [[ -z "$host" ]] && continue
    local bad=""
    if [[ -z "$slots" ]]; then
      bad="no slots: expected 'host slots=N'"
    elif [[ -n "$rest" ]]; then
      bad="unexpected text after '$slots': expected 'host slots=N'"
    elif [[ "$slots" != slots=* ]]; then
      bad="'$slots' is not slots=N"
    elif [[ ! "${slots#slots=}" =~ ^[1-9][0-9]*$ ]]; then
      bad="slots must be a positive whole number, got '${slots#slots=}'"
    elif [[ "$host" == *=* ]]; then
      bad="'$host' is not a host name"
    elif [[ -n "${seen[$host]:-}" ]]; then
      bad="host $host is already listed on line ${seen[$host]}"
    fi
    if [[ -n "$bad" ]]; then
      echo "hostfile.sh: $file line $n: $bad: ${line}" >&2
      exit 2
    fi
    seen[$host]=$n
    hosts+=("$host")
    total_slots=$((total_slots + ${slots#slots=}))
  done < "$file"
  if [[ "${#hosts[@]}" == 0 ]]; then
    echo "hostfile.sh: $file lists no hosts: expected lines 'host slots=N'" >&2
    exit 2
  fi
}

# Run on every host (over pdsh) when a stop is requested: SIGTERM to the ranks of the run whose rendezvous port
# is PORT, and to nothing else, however many other runs this user has there.
stop_ranks() {
  local port="$1" proc
  for proc in /proc/[0-9]*; do
    tr '\0' ' ' 2>/dev/null < "$proc/cmdline" | grep -q -- '-m gptdist.cli train ' || continue
    tr '\0' '\n' 2>/dev/null < "$proc/environ" | grep -qx "MASTER_PORT=$port" || continue
    kill -TERM "${proc#/proc/}" 2>/dev/null || true
  done
}

[[ $# -ge 2 ]] || usage
if [[ "$1" == --stop-ranks ]]; then
  stop_ranks "$2"
  exit 0
fi
if [[ "$1" == --check ]]; then
  validate_hostfile "$2"
  echo "hostfile.sh: $2 is valid: ${#hosts[@]} node(s) (${hosts[*]}), $total_slots rank(s)"
  exit 0
fi
source "$here/common.sh"
accelerate_args=()
if [[ "$1" == --accelerate-config ]]; then
  [[ $# -ge 3 ]] || usage
  gptdist_accelerate_layout hostfile "$2"
  accelerate_args=(--accelerate-config "$GPTDIST_ACCELERATE_CONFIG")
  shift 2
  hostfile="$GPTDIST_ACCELERATE_HOSTFILE"
else
  hostfile="$1"
  shift
fi
validate_hostfile "$hostfile"
if [[ -n "${GPTDIST_ACCELERATE_PROCESSES:-}" && "$GPTDIST_ACCELERATE_PROCESSES" != "$total_slots" ]]; then
  echo "hostfile.sh: accelerate config $GPTDIST_ACCELERATE_CONFIG: num_processes=$GPTDIST_ACCELERATE_PROCESSES but" \
       "its hostfile $hostfile has $total_slots slots: make them agree" >&2
  exit 2
fi

launcher="${LAUNCHER:-pdsh}"
if [[ "${#hosts[@]}" -gt 1 && "$launcher" == pdsh ]] && ! command -v pdsh >/dev/null; then
  echo "hostfile.sh: pdsh not found: install it (apt-get install pdsh), or start launch/node.sh on every node" >&2
  exit 2
fi

python -m gptdist.cli check "$@" "${accelerate_args[@]}" --world "$total_slots"

port="${MASTER_PORT:-$(gptdist_free_port)}"
args=(--hostfile "$hostfile" --launcher "$launcher" --master_port "$port")
if [[ -n "${MASTER_ADDR:-}" ]]; then
  args+=(--master_addr "$MASTER_ADDR")
fi
if [[ -n "${SSH_PORT:-}" ]]; then
  args+=(--ssh_port "$SSH_PORT")
fi
# Its own session: Ctrl-C in this terminal must reach this script only. Sent straight to the deepspeed launcher
# and pdsh, it would cut the ssh connections, and the remote ranks would die of SIGHUP in the middle of a save.
setsid deepspeed --log_level warning "${args[@]}" --no_local_rank --module gptdist.cli train "$@" "${accelerate_args[@]}" &
launcher_pid=$!
if [[ "${#hosts[@]}" == 1 ]]; then
  # One host: the launcher starts the ranks here, without ssh; stop them as launch/train.sh does.
  gptdist_forward_stop_signals "$launcher_pid"
fi

# The ranks run on other machines, out of a local signal's reach: ask every host over pdsh to signal its ranks of
# this run (this script's --stop-ranks mode, from the same checkout path there). They finish the step, save a
# checkpoint together and exit 0, the launchers with them, and this script waits for all of it.
stop() {
  trap '' TERM INT USR1
  echo "hostfile.sh: stop requested: asking every node's ranks to save a checkpoint and exit" >&2
  if [[ "$launcher" == pdsh ]]; then
    PDSH_RCMD_TYPE=ssh PDSH_SSH_ARGS_APPEND="${SSH_PORT:+-p $SSH_PORT}" \
      pdsh -S -w "$(IFS=,; echo "${hosts[*]}")" "$here/hostfile.sh --stop-ranks $port" || true
  else
    # Other launchers: the deepspeed launcher stops each node's launcher, which gives its ranks 30 s to save.
    kill -TERM "$launcher_pid" 2>/dev/null || true
  fi
}
trap stop TERM INT USR1
while true; do
  status=0
  wait "$launcher_pid" || status=$?
  kill -0 "$launcher_pid" 2>/dev/null || break
done
exit "$status"
