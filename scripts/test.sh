#!/usr/bin/env bash
# Runs the formatting check and the linter first (they fail fast), then every
# test of the workspace against the real services (started or installed
# first). This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check   # a formatting diff fails the run (style: rustfmt.toml)
cargo clippy --workspace --all-targets -- -D warnings   # lints: [workspace.lints] in Cargo.toml
bash scripts/services.sh
bash scripts/nchan.sh ensure   # nginx + Nchan for loadtest/tests/nchan.rs: cargo test installs nothing, it fails without them
cargo test --workspace --all-targets
bash scripts/faults.sh --ci   # under load, private RabbitMQ/Redis: a gateway SIGSTOPped 8 s, Redis restarted; fails on any loss (~1.5 min)
bash scripts/browser-test.sh   # the JS client against real processes, the page in Chromium (~2 min; installs chromium, npm ci)
bash scripts/check-compose.sh   # docker-compose.yml, Prometheus and Grafana config (no Docker needed)
bash scripts/check-panels.sh   # every dashboard query against a real Prometheus, stack and load run (~2 min)
