# Helpers shared by the launch scripts (sourced, not run).

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
    # The ranks, not the launcher whose own command line names the module it starts.
    if [[ "$cmd" == *"gptdist.cli train"* && "$cmd" != *"deepspeed.launcher"* ]]; then
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
