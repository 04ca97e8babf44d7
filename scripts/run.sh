#!/usr/bin/env bash
# Starts the stack for a newcomer: checks (starts, installs) PostgreSQL,
# Redis and RabbitMQ, builds in release mode, and starts the backend and N
# gateway nodes in the background. Logs and pids go to run/.
#
#   scripts/run.sh            one gateway on :8084, backend on :8080
#   scripts/run.sh --nodes 3  gateways on :8084, :8085, :8086
#   scripts/stop.sh           stops them
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    *) echo "usage: scripts/run.sh [--nodes N]" >&2; exit 2 ;;
  esac
done
case "$NODES" in ''|*[!0-9]*|0) echo "run: --nodes must be a positive number" >&2; exit 2 ;; esac

bash scripts/services.sh
cargo build --release --workspace
bash scripts/stop.sh >/dev/null 2>&1 || true
mkdir -p run

# One development secret per checkout, shared by every process (and by you,
# for minting test tokens). Set JWT_SECRET yourself in production.
if [ -z "${JWT_SECRET:-}" ]; then
  [ -s run/jwt_secret ] || head -c 24 /dev/urandom | base64 | tr -d '/+=' > run/jwt_secret
  JWT_SECRET=$(cat run/jwt_secret)
fi
export JWT_SECRET

start() { # name, command...
  local name=$1; shift
  "$@" >"run/$name.log" 2>&1 &
  echo $! > "run/$name.pid"
}

wait_ready() { # name url
  for _ in $(seq 1 60); do
    if curl -fsS "$2" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$(cat "run/$1.pid")" 2>/dev/null; then
      echo "run: $1 exited; last lines of run/$1.log:" >&2; tail -n 20 "run/$1.log" >&2; return 1
    fi
    sleep 0.5
  done
  echo "run: $1 not ready at $2 after 30 s (see run/$1.log)" >&2
  return 1
}

for i in $(seq 0 $((NODES - 1))); do
  port=$((8084 + i))
  start "gateway-$port" ./target/release/gateway --listen "0.0.0.0:$port" --node-id "gw-$port" \
    --advertise-url "ws://127.0.0.1:$port"
done
if [ -x ./target/release/backend ]; then
  start backend ./target/release/backend --listen 0.0.0.0:8080
fi
for i in $(seq 0 $((NODES - 1))); do
  port=$((8084 + i)); wait_ready "gateway-$port" "http://127.0.0.1:$port/readyz"
done
[ -f run/backend.pid ] && wait_ready backend "http://127.0.0.1:8080/healthz"

echo
echo "Running (logs and pids in run/; stop with scripts/stop.sh):"
[ -f run/backend.pid ] && echo "  backend   http://127.0.0.1:8080   (API, /metrics, /healthz)"
for i in $(seq 0 $((NODES - 1))); do
  port=$((8084 + i))
  echo "  gateway   ws://127.0.0.1:$port/post/feed/posted   (node gw-$port; /metrics, /readyz)"
done
echo "  JWT_SECRET is in run/jwt_secret"
