#!/usr/bin/env bash
# What GATEWAY_DEVICE_SEND_BUFFER costs at rest (issue 10): 20,000 idle
# devices (the load generator, --rate 0) on 2 gateways, once with the
# default bounded send buffer (64 KiB) and once with 4 MiB. For each it
# prints the gateways' RSS per device (VmRSS from /proc, after minus before
# the devices) and the kernel's TCP memory (/proc/net/sockstat, `TCP: ...
# mem`, in pages, for the whole machine: both ends of every connection),
# read once every device is up (the gateways' gateway_connections say so)
# and the gateways' RSS has settled; the TCP figure is the highest of 5 reads
# (before, and with the devices up), since other processes move it too.
#
#   scripts/sockmem.sh              (debug build)
#   scripts/sockmem.sh --release    (release build)
#   DEVICES=4000 scripts/sockmem.sh (fewer devices)
#
# Own RabbitMQ vhost, own membership key, own JWT secret; it stops every
# process it starts by pid and deletes the vhost and the key.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=debug
[ "${1:-}" = "--release" ] && PROFILE=release
DEVICES=${DEVICES:-20000}
BUFFERS=${BUFFERS:-"65536 4194304"}

say() { echo "sockmem: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

if [ "$PROFILE" = release ]; then cargo build --quiet --release -p gateway -p loadtest; else cargo build --quiet -p gateway -p loadtest; fi
BIN=target/$PROFILE

ID="sockmem-$$"
VHOST=$ID
KEY="sockmem:$$:nodes"
AMQP="amqp://guest:guest@127.0.0.1:5672/$VHOST"
JWT_SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
export JWT_SECRET
D=$(mktemp -d /tmp/feedgate-sockmem.XXXXXX)
GW_PIDS=()
LT_PID=""
VHOST_MADE=""

stop_pid() { # pid: TERM, wait up to 15 s, then KILL; always reaped
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  [ -n "$LT_PID" ] && stop_pid "$LT_PID"
  for p in "${GW_PIDS[@]}"; do stop_pid "$p"; done
  [ -n "$VHOST_MADE" ] && rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1
  redis-cli del "$KEY" >/dev/null 2>&1
  if [ "$rc" = 0 ]; then rm -rf "$D"; else say "logs kept in $D"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v rabbitmqctl >/dev/null || die "rabbitmqctl is needed (own vhost)"
rabbitmqctl -q add_vhost "$VHOST" >/dev/null
VHOST_MADE=1
rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
metric_sum() { # name ports...: the sum of an unlabelled metric over the gateways
  local name=$1; shift
  local total=0 v
  for p in "$@"; do
    v=$(curl -fsS "http://127.0.0.1:$p/metrics" 2>/dev/null | awk -v n="$name" '$1 == n {print $2}')
    total=$(python3 -c "print(int(float('$total') + float('${v:-0}')))")
  done
  echo "$total"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
tcp_mem_pages() { awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat; }
PAGE=$(getconf PAGESIZE)

ROWS=()
for BUF in $BUFFERS; do
  GW_PIDS=()
  PORTS=()
  for i in 1 2; do
    p=$(free_port); PORTS+=("$p")
    AMQP_URL=$AMQP MEMBERSHIP_KEY=$KEY RUST_LOG=warn GATEWAY_DEVICE_SEND_BUFFER=$BUF \
      "$BIN/gateway" --listen "127.0.0.1:$p" --node-id "$ID-$BUF-$i" --advertise-url "ws://127.0.0.1:$p" \
      >"$D/gateway-$BUF-$i.log" 2>&1 &
    GW_PIDS+=($!)
  done
  for p in "${PORTS[@]}"; do
    for _ in $(seq 1 240); do curl -fsS -o /dev/null "http://127.0.0.1:$p/readyz" 2>/dev/null && continue 2; sleep 0.25; done
    die "gateway :$p not ready within 60 s"
  done
  # Both nodes in each other's ring (the load generator spreads devices by it).
  for _ in $(seq 1 240); do [ "$(metric_sum gateway_ring_members "${PORTS[@]}")" = 4 ] && break; sleep 0.25; done
  RSS0=()
  for pid in "${GW_PIDS[@]}"; do RSS0+=("$(rss_kib "$pid")"); done
  MEM0=0
  for _ in 1 2 3 4 5; do m=$(tcp_mem_pages); [ "$m" -gt "$MEM0" ] && MEM0=$m; sleep 1; done

  # Held for up to 10 minutes; stopped by pid once measured.
  MEMBERSHIP_KEY=$KEY AMQP_URL=$AMQP "$BIN/loadtest" run --users "$DEVICES" --rate 0 --duration 600 --drain 0 \
    --settle 1 --metrics-listen off --quiet --user-prefix "$ID-$BUF" >"$D/loadtest-$BUF.log" 2>&1 &
  LT_PID=$!
  say "SO_SNDBUF $BUF: waiting for $DEVICES devices on 2 gateways"
  for _ in $(seq 1 1200); do
    [ "$(metric_sum gateway_connections "${PORTS[@]}")" -ge "$DEVICES" ] && break
    kill -0 "$LT_PID" 2>/dev/null || die "the load generator exited (see $D/loadtest-$BUF.log)"
    sleep 0.25
  done
  [ "$(metric_sum gateway_connections "${PORTS[@]}")" -ge "$DEVICES" ] || die "not every device connected within 5 minutes"
  # Up: now until the memory stops moving (two reads 1 s apart within 1%),
  # the devices' first pings and answers included.
  prev=0
  for _ in $(seq 1 30); do
    now=0; for pid in "${GW_PIDS[@]}"; do now=$((now + $(rss_kib "$pid"))); done
    python3 -c "import sys; sys.exit(0 if abs($now - $prev) <= 0.01 * $now else 1)" && break
    prev=$now; sleep 1
  done
  RSS1=(); for pid in "${GW_PIDS[@]}"; do RSS1+=("$(rss_kib "$pid")"); done
  # The machine's figure moves with whatever else runs: the highest of 5
  # reads, 1 s apart, with the devices up.
  MEM1=0
  for _ in 1 2 3 4 5; do m=$(tcp_mem_pages); [ "$m" -gt "$MEM1" ] && MEM1=$m; sleep 1; done
  CONNS=$(metric_sum gateway_connections "${PORTS[@]}")
  SOCKSTAT=$(grep '^TCP:' /proc/net/sockstat)
  stop_pid "$LT_PID"; LT_PID=""
  for p in "${GW_PIDS[@]}"; do stop_pid "$p"; done
  GW_PIDS=()

  ROWS+=("$(python3 - "$BUF" "$CONNS" "${RSS0[0]}" "${RSS0[1]}" "${RSS1[0]}" "${RSS1[1]}" "$MEM0" "$MEM1" "$PAGE" <<'PY'
import sys
buf, conns, r0a, r0b, r1a, r1b, m0, m1, page = map(int, sys.argv[1:])
before, after = r0a + r0b, r1a + r1b
per = (after - before) * 1024 / conns
kmem = (m1 - m0) * page
print(f"| {buf // 1024} KiB | {conns} | {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB | {per / 1024:.2f} KiB "
      f"| {m0} -> {m1} pages | {kmem / 2**20:.1f} MiB ({kmem / conns:.0f} B per device) |")
PY
)")
  say "SO_SNDBUF $BUF: $CONNS devices, sockstat at the read: $SOCKSTAT"
done

echo
echo "$DEVICES idle devices on 2 gateways ($PROFILE build), $(nproc) cores, $(uname -r):"
echo
echo "| GATEWAY_DEVICE_SEND_BUFFER | devices | gateways' RSS (both) | RSS per device | kernel TCP mem (sockstat) | TCP mem added |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
