#!/usr/bin/env bash
# A real Slurm cluster on this one machine, to try slurm/train.sbatch (and to test it in CI) before a real cluster:
# one controller (slurmctld) and two compute nodes, node1 and node2 (two slurmd on distinct ports, Slurm's
# "multiple slurmd" mode), authenticated by munge.
#   slurm/local-cluster.sh up       install (apt) if needed, write the config, start the daemons; idempotent
#   slurm/local-cluster.sh status   the daemons, the nodes and the queue; exit 0 when everything is up
#   slurm/local-cluster.sh down     cancel every job, stop the daemons by the PIDs in their pid files; idempotent
# Needs root (it writes /etc/slurm/slurm.conf and an /etc/hosts line). LOCAL_SLURM_NODES=N for N nodes (default 2).
# It refuses to overwrite a slurm.conf that it did not write.
set -euo pipefail

NODES="${LOCAL_SLURM_NODES:-2}"
# A whole number before any arithmetic sees it (bash arithmetic would evaluate a name or subscript it is given).
if [[ ! "$NODES" =~ ^[1-9][0-9]{0,2}$ ]]; then
  echo "local-cluster: LOCAL_SLURM_NODES=${NODES:0:40} is not a whole number in 1..999" >&2
  exit 2
fi
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARK="# written by gptdist slurm/local-cluster.sh"
HOSTS_MARK="# gptdist local slurm cluster"
RUN="${LOCAL_SLURM_RUN_DIR:-/run}"       # where the pid files and the state below live (another folder: tests)
STATE="$RUN/gptdist-local-cluster"        # what `up` started and created, so that `down` undoes only that
CTLD_PID="$RUN/slurmctld.pid"
MUNGE_PID="$RUN/munge/munged.pid"
LOG_DIR=/var/log/slurm
NODE_PORT_BASE=17000                      # node I listens on 17000+I: all slurmd share one network namespace

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: $*" >&2; exit 1; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }
slurmd_pidfile() { echo "$RUN/slurmd-$1.pid"; }

# The daemon a pid file belongs to.
daemon_of() {
  case "$(basename "$1")" in
    slurmctld.pid) echo slurmctld ;;
    slurmd-*.pid) echo slurmd ;;
    munged.pid) echo munged ;;
  esac
}

# The PID in a pid file, if that process is alive and is the daemon the file is for: a stale pid file whose number
# now belongs to an unrelated process names nothing (/proc/PID/comm tells).
live_pid() {
  local file="$1" pid comm
  [[ -s "$file" ]] || return 1
  pid="$(tr -dc '0-9' < "$file")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [[ -n "$comm" && "$comm" == "$(daemon_of "$file")" ]] || return 1
  echo "$pid"
}

# Remember that `up` created PATH (a file that was not there), so that `down` removes it again.
created() { mkdir -p "$STATE"; echo "$1" >> "$STATE/created"; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
  # Without this policy the packages' maintainer scripts would start the daemons with Debian's default config.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_made=yes
  fi
  say "installing slurmctld, slurmd, slurm-client and munge"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  if [[ "${policy_made:-}" == yes ]]; then
    rm -f /usr/sbin/policy-rc.d  # only needed while the packages install
  fi
}

write_config() {
  if [[ -e "$CONF" ]] && ! grep -qxF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away to use the local cluster"
  fi
  local host hw node i new
  host="$(hostname -s)"
  # This machine's hardware as slurmd sees it (CPUs, sockets, cores, memory), minus its own NodeName.
  hw="$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')"
  mkdir -p "$CONF_DIR" "$LOG_DIR" /var/lib/slurm/slurmctld
  chown slurm: /var/lib/slurm/slurmctld "$LOG_DIR"
  new="$(mktemp)"
  {
    echo "$MARK"
    cat <<EOF
ClusterName=gptdist-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# No cgroups needed: plain process tracking, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Schedule every 2 s, and let a requeued job start again ~10 s after it ended (default: minutes).
SchedulerParameters=sched_interval=2,bf_interval=2
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
EOF
    for node in $(node_names); do
      i="${node#node}"
      echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + i)) $hw State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  } > "$new"
  if ! cmp -s "$new" "$CONF"; then
    if live_pid "$CTLD_PID" >/dev/null; then
      rm -f "$new"
      die "$CONF would change while the cluster runs: run '$0 down' first"
    fi
    [[ -e "$CONF" ]] || created "$CONF"
    mv "$new" "$CONF"
    chmod 644 "$CONF"
  else
    rm -f "$new"
  fi
  # slurmd starts even where no cgroup file system is usable once the plugin is pinned.
  if [[ ! -e "$CONF_DIR/cgroup.conf" ]]; then
    echo "CgroupPlugin=cgroup/v1" > "$CONF_DIR/cgroup.conf"
    created "$CONF_DIR/cgroup.conf"
  fi
  for node in $(node_names); do mkdir -p "/var/spool/slurmd/$node"; done
}

# deepspeed's --no_ssh mode needs the nodes to have distinct names; here they all are this machine.
add_hosts_line() {
  grep -qF "$HOSTS_MARK" /etc/hosts && return
  echo "127.0.0.1 $(node_names | tr '\n' ' ')$HOSTS_MARK" >> /etc/hosts
  mkdir -p "$STATE"
  touch "$STATE/hosts-line"
}

remove_hosts_line() {
  [[ -e "$STATE/hosts-line" ]] || return 0  # only the line this script's `up` added
  rm -f "$STATE/hosts-line"
  grep -qF "$HOSTS_MARK" /etc/hosts || return 0
  # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file.
  local kept
  kept="$(grep -vF "$HOSTS_MARK" /etc/hosts)"
  printf '%s\n' "$kept" > /etc/hosts
}

start_munge() {
  if live_pid "$MUNGE_PID" >/dev/null; then
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key
    created /etc/munge/munge.key
  fi
  chown munge: /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged
  touch "$STATE/munged"
}

start_daemons() {
  mkdir -p "$STATE"
  start_munge
  if ! live_pid "$CTLD_PID" >/dev/null; then
    # -c: start from an empty job table; jobs of an earlier session must not come back.
    slurmctld -c
  fi
  local node
  for node in $(node_names); do
    live_pid "$(slurmd_pidfile "$node")" >/dev/null || slurmd -N "$node"
  done
}

wait_idle() {
  local i idle
  for ((i = 0; i < 60; i++)); do
    idle="$(sinfo -h -N -t idle,alloc,mix -o %N 2>/dev/null | sort -u | wc -l)"
    if [[ "$idle" -ge "$NODES" ]]; then
      return 0
    fi
    sleep 0.5
  done
  sinfo -N >&2 || true
  die "the nodes did not become idle within 30 s; see $LOG_DIR/"
}

# TERM to the daemons named by these pid files, together (each takes ~2 s to shut down); KILL after 10 s.
stop_pid_files() {
  local file pid pids=() i
  for file in "$@"; do
    if pid="$(live_pid "$file")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for ((i = 0; i < 50; i++)); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    pids=("${alive[@]}")
    [[ "${#pids[@]}" == 0 ]] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$@"
}

cmd_up() {
  [[ "$(id -u)" == 0 ]] || die "needs root (it installs packages and writes /etc/slurm)"
  install_packages
  write_config
  add_hosts_line
  start_daemons
  wait_idle
  say "up: controller $(hostname -s), nodes $(node_names | tr '\n' ' ')(sinfo, squeue, sbatch are ready)"
}

cmd_down() {
  [[ "$(id -u)" == 0 ]] || die "needs root"
  local node i
  if live_pid "$CTLD_PID" >/dev/null; then
    # Jobs first, so that no job step is orphaned by its slurmd going away.
    local jobs
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
    [[ "${#jobs[@]}" == 0 ]] || scancel --quiet "${jobs[@]}" || true
    for ((i = 0; i < 30; i++)); do
      [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && break
      sleep 1
    done
  fi
  local files=("$CTLD_PID")
  for node in $(node_names); do files+=("$(slurmd_pidfile "$node")"); done
  stop_pid_files "${files[@]}"
  if [[ -e "$STATE/munged" ]]; then
    stop_pid_files "$MUNGE_PID"       # last: the Slurm daemons authenticate through it while they shut down
    rm -f "$STATE/munged"
  fi
  remove_hosts_line
  # What `up` created, removed again (a file someone changed since is kept: it is theirs now).
  if [[ -s "$STATE/created" ]]; then
    local path
    while IFS= read -r path; do
      case "$path" in
        "$CONF") grep -qxF "$MARK" "$path" 2>/dev/null && rm -f "$path" ;;
        "$CONF_DIR/cgroup.conf") [[ "$(cat "$path" 2>/dev/null)" == "CgroupPlugin=cgroup/v1" ]] && rm -f "$path" ;;
        /etc/munge/munge.key) rm -f "$path" ;;
      esac
    done < "$STATE/created"
    rm -f "$STATE/created"
  fi
  say "down"
}

cmd_status() {
  local ok=0 pid pair
  for pair in "slurmctld:$CTLD_PID" "munged:$MUNGE_PID" $(for n in $(node_names); do echo "slurmd-$n:$(slurmd_pidfile "$n")"; done); do
    if pid="$(live_pid "${pair#*:}")"; then
      echo "${pair%%:*}: running (pid $pid)"
    else
      echo "${pair%%:*}: stopped"
      ok=1
    fi
  done
  if [[ "$ok" == 0 ]]; then
    sinfo -N || ok=1
    squeue || ok=1
  fi
  return "$ok"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: slurm/local-cluster.sh up|down|status" >&2; exit 2 ;;
esac
