#!/usr/bin/env bash
# Stops what scripts/run.sh started (SIGTERM: gateways close devices with
# 1001 and leave the broker cleanly), waiting up to 15 s for each.
set -uo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
for f in run/*.pid; do
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "stop: $f did not exit, killing"; kill -KILL "$pid"; }
    echo "stopped $(basename "$f" .pid)"
  fi
  rm -f "$f"
done
