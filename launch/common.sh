# Helpers shared by the launch scripts (sourced, not run).

# gptdist_number WHO NAME VALUE MIN [MAX]: VALUE must be a whole number in MIN..MAX before any arithmetic sees it
# (bash arithmetic evaluates a variable name or array subscript it is handed, and a command substitution inside
# one: GPUS_PER_NODE='BASH_VERSINFO[$(cmd)0]' would run cmd). Exits 2 with one line otherwise.
gptdist_number() {
  local who="$1" name="$2" value="$3" min="$4" max="${5:-999999999}"
  if [[ ! "$value" =~ ^[0-9]{1,9}$ ]] || (( 10#$value < min || 10#$value > max )); then
    printf '%s: %s=%q is not a whole number in %s..%s\n' "$who" "$name" "${value:0:60}" "$min" "$max" >&2
    exit 2
  fi
}

# Credentials in a `tracking.uri=...` override (scheme://user:password@host or scheme://token@host) move into
# MLflow's variables (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, inherited by the ranks) before any launcher logs its
# command line; the arguments, with the URI left without them, are in the array `gptdist_args`.
gptdist_lift_credentials() {
  gptdist_args=()
  local arg info re='^(tracking\.uri=[A-Za-z][A-Za-z0-9+.-]*://)([^/?#@]*)@(.*)$'
  for arg in "$@"; do
    if [[ "$arg" =~ $re ]]; then
      info="${BASH_REMATCH[2]}"
      arg="${BASH_REMATCH[1]}${BASH_REMATCH[3]}"
      if [[ "$info" == *:* ]]; then
        MLFLOW_TRACKING_USERNAME="$(gptdist_unquote "${info%%:*}")"
        MLFLOW_TRACKING_PASSWORD="$(gptdist_unquote "${info#*:}")"
        export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
      elif [[ -n "$info" ]]; then
        MLFLOW_TRACKING_TOKEN="$(gptdist_unquote "$info")"
        export MLFLOW_TRACKING_TOKEN
      fi
    fi
    gptdist_args+=("$arg")
  done
}

# %XX-decoding as Python's urllib.parse.unquote does it; the value travels in the environment, not on a command line.
gptdist_unquote() {
  GPTDIST_QUOTED="$1" python -c 'import os, sys, urllib.parse; sys.stdout.write(urllib.parse.unquote(os.environ["GPTDIST_QUOTED"]))'
}

# Number of GPUs on this node, 0 when there is none.
gptdist_local_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# On a node without GPUs: DeepSpeed's CPU accelerator, and the cores shared between the ranks (with default
# thread counts, ranks oversubscribe the cores and run many times slower).
gptdist_cpu_env() {
  local ranks="$1"
  gptdist_number gptdist GPUS_PER_NODE "$ranks" 1 100000
  if [[ "$(gptdist_local_gpus)" == 0 ]]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    local cores
    cores="$(nproc)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}"
  fi
}

# A TCP port that is free now on this host.
gptdist_free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()'
}

# Every process below PID, depth first.
gptdist_descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    echo "$child"
    gptdist_descendants "$child"
  done
}

# Ask the training ranks started under PID to stop: each finishes its step, saves a checkpoint and exits 0.
gptdist_stop_ranks() {
  local pid cmd
  for pid in $(gptdist_descendants "$1"); do
    cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)"
    # The ranks, not the launcher (deepspeed's or accelerate's) whose own command line names the module it starts.
    if [[ "$cmd" == *"gptdist.cli train"* && "$cmd" != *"deepspeed.launcher"* && "$cmd" != *"accelerate launch"* ]]; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
}

# Wait for the launcher PID; on SIGTERM, SIGINT or SIGUSR1 pass a stop request to its ranks (the deepspeed
# launcher would otherwise kill them before they can save). Exits with the launcher's status.
gptdist_forward_stop_signals() {
  local launcher="$1" status=0
  trap "gptdist_stop_ranks $launcher" TERM INT USR1
  while true; do
    status=0
    wait "$launcher" || status=$?  # a trapped signal interrupts wait (status > 128) while the launcher runs on
    kill -0 "$launcher" 2>/dev/null || break
  done
  exit "$status"
}

# This node's place in a multi-node run (launch/node.sh, launch/accelerate.sh), from NODE_RANK, NUM_NODES,
# NODE_HOSTS, MASTER_ADDR, MASTER_PORT and GPUS_PER_NODE, with Slurm's values as defaults. Sets node_rank, num_nodes,
# ranks, hosts, master_addr and master_port, or exits 2 with one line that starts with WHO. NEED_HOSTS=yes: the
# nodes' names are required (the deepspeed launcher keys the nodes by name); otherwise they only give MASTER_ADDR.
gptdist_node_layout() {
  local who="$1" need_hosts="$2"
  fail() { echo "$who: $*" >&2; exit 2; }
  node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
  num_nodes="${NUM_NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
  ranks="${GPUS_PER_NODE:-$(gptdist_local_gpus)}"
  if [[ "$ranks" == 0 ]]; then
    ranks=2
  fi
  gptdist_number "$who" NUM_NODES "$num_nodes" 1 100000
  gptdist_number "$who" NODE_RANK "$node_rank" 0 $((10#$num_nodes - 1))
  gptdist_number "$who" GPUS_PER_NODE "$ranks" 1 100000
  hosts=()
  if [[ -n "${NODE_HOSTS:-}" ]]; then
    read -r -a hosts <<< "${NODE_HOSTS//,/ }"
  elif [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  elif [[ "$num_nodes" == 1 ]]; then
    hosts=(localhost)
  elif [[ "$need_hosts" == yes ]]; then
    fail "NUM_NODES=$num_nodes but no NODE_HOSTS: set NODE_HOSTS to the nodes' names in node-rank order"
  elif [[ -z "${MASTER_ADDR:-}" ]]; then
    fail "NUM_NODES=$num_nodes but no MASTER_ADDR: set it to the address of node 0 (or NODE_HOSTS to the nodes' names)"
  fi
  if [[ "${#hosts[@]}" -gt 0 ]]; then
    # The launcher silently drops hosts beyond --num_nodes and refuses duplicates; say so plainly instead.
    [[ "${#hosts[@]}" -ge "$num_nodes" ]] || fail "NUM_NODES=$num_nodes but only ${#hosts[@]} host(s) given: ${hosts[*]}"
    hosts=("${hosts[@]:0:$num_nodes}")
    if [[ "$(printf '%s\n' "${hosts[@]}" | sort -u | wc -l)" -ne "$num_nodes" ]]; then
      fail "the node names must be distinct (deepspeed keys the nodes by name): ${hosts[*]}"
    fi
  fi

  master_addr="${MASTER_ADDR:-${hosts[0]}}"
  if [[ -n "${MASTER_PORT:-}" ]]; then
    gptdist_number "$who" MASTER_PORT "$MASTER_PORT" 1 65535
    master_port="$MASTER_PORT"
  elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
    gptdist_number "$who" SLURM_JOB_ID "$SLURM_JOB_ID" 0
    gptdist_number "$who" SLURM_RESTART_COUNT "${SLURM_RESTART_COUNT:-0}" 0
    # Every node computes the same port with no communication; two jobs on one node (or a job and its requeued
    # self, whose old sockets may linger) get different ones.
    master_port=$((20000 + (10#$SLURM_JOB_ID % 3000) * 10 + 10#${SLURM_RESTART_COUNT:-0} % 10))
  elif [[ "$num_nodes" == 1 ]]; then
    master_port="$(gptdist_free_port)"
  else
    fail "set MASTER_PORT: every node must use the same rendezvous port"
  fi
}

# An accelerate config YAML (`launch/*.sh --accelerate-config FILE ...`) as the node layout, read by accelerate's
# own loader (gptdist/launchers/accelerate_config.py): exports NUM_NODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (and NODE_HOSTS) where the environment does not set them, and sets GPTDIST_ACCELERATE_CONFIG, the
# file's absolute path, which the ranks get too (--accelerate-config) for its training settings. A file gptdist
# cannot use stops here with one line and exit status 2. KIND: one-node, node or hostfile. Without FILE: accelerate's
# default config file if there is one (GPTDIST_ACCELERATE_CONFIG is empty otherwise).
gptdist_accelerate_layout() {
  local assignments
  assignments="$(python -m gptdist.launchers.accelerate_config --for "$1" ${2:+"$2"})" || exit 2
  eval "$assignments"
}
