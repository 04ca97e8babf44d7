#!/usr/bin/env bash
# Runs the Autobahn WebSocket conformance cases (PyPI `kosoku`, a Python 3
# driver of the Autobahn case files) against the gateway's own reader,
# writer and handshake in an echo server (gateway/examples/autobahn_echo.rs),
# and writes autobahn/summary.txt. Usage: scripts/autobahn.sh [port]
#
# Cases 12.* and 13.* (permessage-deflate) are left out: the gateway does
# not negotiate compression, so they can only report UNIMPLEMENTED.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-9301}"
command -v kosoku >/dev/null || { echo "kosoku is not installed: pip install kosoku" >&2; exit 1; }
cargo build -q -p gateway --example autobahn_echo
target/debug/examples/autobahn_echo "127.0.0.1:$port" &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
out="$(mktemp -d)"
kosoku "127.0.0.1:$port" -x '12.*' -x '13.*' -p 2 -o "$out" | tail -1
python3 - "$out/index.json" > autobahn/summary.txt <<'PY'
import collections, json, sys
cases = next(iter(json.load(open(sys.argv[1])).values()))
by_section = collections.defaultdict(collections.Counter)
for case, r in cases.items():
    by_section[case.split(".")[0]][r["behavior"] + "/" + r["behaviorClose"]] += 1
print("Autobahn cases against gateway/examples/autobahn_echo.rs (the gateway's reader, writer, handshake)")
print("regenerate: scripts/autobahn.sh   (needs: pip install kosoku)   excluded: 12.* 13.* (no compression)")
print(f"cases: {len(cases)}")
for s in sorted(by_section, key=int):
    print(f"section {s:>2}: " + ", ".join(f"{k} {n}" for k, n in sorted(by_section[s].items())))
odd = [f"{c}: {r['behavior']}/{r['behaviorClose']}" for c, r in cases.items() if (r["behavior"], r["behaviorClose"]) != ("OK", "OK")]
print("not OK/OK:", ", ".join(odd) if odd else "none")
PY
rm -rf "$out"
cat autobahn/summary.txt
