#!/usr/bin/env bash
# The JavaScript client's tests (clients/js/test/client.test.js) and the
# page's browser tests (clients/js/test/browser.test.js): real gateway and
# backend processes (the debug binaries), the machine's PostgreSQL, Redis
# and RabbitMQ, and Debian's Chromium driven by playwright-core (no browser
# download). Installs what is missing: chromium and Node with apt, the npm
# packages from the committed package-lock.json.
#
#   scripts/browser-test.sh              client and browser tests
#   scripts/browser-test.sh screenshot   regenerates docs/page.png
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
APT_UPDATED=
apt_install() {
  [ -n "$APT_UPDATED" ] || { $SUDO apt-get update -qq; APT_UPDATED=1; }
  echo "browser-test: installing $* with apt"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
# node --test, fetch and AbortController as the tests use them.
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || { echo "browser-test: Node $major is too old (20 or newer)" >&2; exit 1; }
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || apt_install chromium

bash scripts/services.sh
cargo build -p backend -p gateway --bins
cd clients/js
npm ci --no-audit --no-fund --loglevel=error   # exactly the committed package-lock.json
case "${1:-test}" in
  test) node --test --test-reporter=spec --test-concurrency=1 test/client.test.js test/browser.test.js ;;
  screenshot) node test/screenshot.js ../../docs/page.png ;;
  *) echo "usage: scripts/browser-test.sh [test|screenshot]" >&2; exit 2 ;;
esac
