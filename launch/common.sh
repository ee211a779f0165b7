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
