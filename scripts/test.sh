#!/usr/bin/env bash
# Runs every test of the workspace against the real services (started or
# installed first), then the linter. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo test --workspace --all-targets
bash scripts/check-compose.sh   # docker-compose.yml, Prometheus and Grafana config (no Docker needed)
cargo clippy --workspace --all-targets -- -D warnings
