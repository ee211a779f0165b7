#!/usr/bin/env bash
# An MLflow tracking server for runs on several nodes (rank 0 of a run may land on any node; an SQLite file in a
# run directory suits one machine, a server suits a cluster).
#   launch/mlflow-server.sh [--host H] [--port P] [--store DIR] [--workers N] [-- MLFLOW-SERVER-OPTIONS]
# Runs in the foreground until stopped. Runs, params and metrics go to SQLite (DIR/mlflow.db), artifacts to
# DIR/artifacts, served through the server itself, so clients need no shared file system. Binds 127.0.0.1 unless
# told otherwise: the server has no authentication, so expose it (--host 0.0.0.0) only on a trusted network;
# clients that reach it by a name rather than an IP need `-- --allowed-hosts NAME:PORT` (MLflow refuses other Host
# headers). Then train with tracking.uri=http://HOST:PORT.
set -euo pipefail

host=127.0.0.1
port=5000
store="runs/mlflow-server"
workers=2
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host|--port|--store|--workers)
      [[ $# -ge 2 ]] || { echo "mlflow-server.sh: $1 needs a value" >&2; exit 2; }
      case "$1" in --host) host="$2" ;; --port) port="$2" ;; --store) store="$2" ;; --workers) workers="$2" ;; esac
      shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "usage: launch/mlflow-server.sh [--host H] [--port P] [--store DIR] [--workers N] [-- OPTIONS]" >&2; exit 2 ;;
  esac
done
[[ "$port" =~ ^[0-9]{1,5}$ ]] && (( 10#$port >= 1 && 10#$port <= 65535 )) \
  || { echo "mlflow-server.sh: --port $port is not a port number (1..65535)" >&2; exit 2; }
[[ "$workers" =~ ^[1-9][0-9]{0,2}$ ]] || { echo "mlflow-server.sh: --workers $workers is not a whole number in 1..999" >&2; exit 2; }
command -v mlflow >/dev/null || { echo "mlflow-server.sh: mlflow not found: bash launch/setup.sh installs it" >&2; exit 2; }

mkdir -p "$store/artifacts"
store="$(cd "$store" && pwd)"
# The address clients use: a server bound to every interface is reached by this machine's name.
shown="$host"
if [[ "$host" == 0.0.0.0 || "$host" == "::" ]]; then
  shown="$(hostname -f 2>/dev/null || hostname)"
fi
echo "MLflow tracking URI: http://$shown:$port   (store $store; train with tracking.uri=http://$shown:$port)"
exec mlflow server --host "$host" --port "$port" --workers "$workers" \
  --backend-store-uri "sqlite:///$store/mlflow.db" --artifacts-destination "$store/artifacts" "${extra[@]}"
