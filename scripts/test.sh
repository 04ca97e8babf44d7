#!/usr/bin/env bash
# Runs the formatting check and the linter first (they fail fast), then every
# test of the workspace against the real services (started or installed
# first). This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check   # a formatting diff fails the run (style: rustfmt.toml)
cargo clippy --workspace --all-targets -- -D warnings   # lints: [workspace.lints] in Cargo.toml
bash scripts/services.sh
cargo test --workspace --all-targets
bash scripts/check-compose.sh   # docker-compose.yml, Prometheus and Grafana config (no Docker needed)
