#!/usr/bin/env bash
# The benchmark suite (BENCHMARKS.md): builds release, starts its own
# gateway cluster (own RabbitMQ vhost, own membership key, own JWT secret)
# and nginx + Nchan, runs the scenarios with target/release/loadtest, and
# writes BENCHMARKS.md with the machine, the exact commands, the figures
# and the charts (bench/results/<scenario>/*.svg). Stops everything it
# started, whatever happens.
#
#   scripts/bench.sh                      every scenario (about 10-15 minutes)
#   scripts/bench.sh --quick              small smoke version (< 3 minutes)
#   scripts/bench.sh --only hold,churn    some scenarios: hold proxied throughput latency connect churn rebalance celebrity
#   scripts/bench.sh --no-nchan           without the nginx + Nchan peer
#   scripts/bench.sh --out FILE           write FILE instead of BENCHMARKS.md
#
# Scenarios:
#   hold        N idle authenticated devices over 4 gateway nodes (and on Nchan): RSS per connection
#   proxied     idle devices on 4 nodes, each to its owner, then dialling the nodes round-robin as a load
#               balancer would (--spread; 3 in 4 proxied): all nodes' RSS growth per device, connect rate
#   throughput  the machine's floor first (bench/floor: one 150-byte write per message per loopback
#               TCP connection, nothing else), then a rate sweep; the highest rate with zero loss
#               (and on Nchan), each step also as a ratio to the floor, with the servers' CPU per delivery
#   latency     half the floor (deliveries/s): p50/p99/p999 (and on Nchan, at the same rate); without
#               a floor from this run, half the best zero-loss rate
#   connect     the connect rate, JWT checked: N devices on 2 nodes as fast as they go (--connect-rate
#               100000), failures by cause
#   churn       devices closing and reconnecting (?since=) while events flow
#   rebalance   a 5th node joins during the run, then one node is SIGKILLed; loss and recovery time
#   celebrity   one author with 100,000 online followers, one post through the backend: POST to the
#               devices (p50, p99, last) and until every follower's feed in Redis holds it (3 runs)
#
# Raw JSON reports and logs stay in run/bench/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=""
ONLY="hold,proxied,throughput,latency,connect,churn,rebalance,celebrity"
NCHAN=1
OUT=BENCHMARKS.md
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    --no-nchan) NCHAN=""; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "usage: scripts/bench.sh [--quick] [--only hold,proxied,throughput,latency,connect,churn,rebalance,celebrity] [--no-nchan] [--out FILE]" >&2; exit 2 ;;
  esac
done
for s in ${ONLY//,/ }; do
  case $s in hold|proxied|throughput|latency|connect|churn|rebalance|celebrity) ;; *) echo "bench: unknown scenario $s" >&2; exit 2 ;; esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---- sizes -----------------------------------------------------------------
NODES=4
# BENCH_PORT_OFFSET=N moves every port this script listens on by N, so two
# checkouts can run it side by side (their figures then share the cores).
PORT_OFFSET=${BENCH_PORT_OFFSET:-0}
BASE_PORT=$((8184 + PORT_OFFSET))   # gateways on 8184.., away from scripts/run.sh's 8084..
NCHAN_PORT=$((8190 + PORT_OFFSET))
SOURCE_IPS=127.0.0.1-127.0.0.16
if [ -n "$QUICK" ]; then
  HOLD_USERS=4000; HOLD_NODES=4; HOLD_WORKERS=2; HOLD_SETTLE=2; HOLD_SECS=2; HOLD_NGINX_WORKERS=2
  TP_USERS=2000; TP_FANOUT=50; TP_SECS=3
  FLOOR_CONNS=2000; FLOOR_SECS=2; FLOOR_STEPS="0.5 0.9"
  LAT_SECS=3
  CONNECT_USERS=4000; CONNECT_WORKERS=2
  CHURN_USERS=2000; CHURN_RATE=100; CHURN_FANOUT=20; CHURN_PER_S=100; CHURN_SECS=5
  RB_USERS=2000; RB_RATE=100; RB_FANOUT=20; RB_SECS=16; RB_JOIN_AT=3; RB_KILL_AT=7
  DRAIN=5; RB_DRAIN=8
  CELEB_USERS=3000; CELEB_NODES=2; CELEB_WORKERS=1; CELEB_RUNS=1
  PROXIED_USERS=4000; PROXIED_SETTLE=2
else
  # The product target: 200,000 devices. 14 nodes (about 14,300 each):
  # the ring does not split users exactly evenly, and a node refuses
  # connections beyond 19,500 (20,000 open files per process). 14 load
  # generator workers, 13 nginx workers (reuseport spreads evenly).
  HOLD_USERS=200000; HOLD_NODES=14; HOLD_WORKERS=14; HOLD_SETTLE=25; HOLD_SECS=5; HOLD_NGINX_WORKERS=13
  TP_USERS=20000; TP_FANOUT=100; TP_SECS=10
  # The floor's receiver holds every connection in one process (20,000
  # open files): 10,000, as issue 16 measured it.
  FLOOR_CONNS=10000; FLOOR_SECS=5
  # The sweep's steps as fractions of the floor (deliveries/s): the
  # target is the highest zero-loss rate >= 0.9 of it.
  FLOOR_STEPS="0.5 0.7 0.8 0.9 1.0"
  LAT_SECS=20
  # 30,000 devices on the 2 throughput nodes, as issue 16 measured.
  CONNECT_USERS=${CONNECT_USERS:-30000}; CONNECT_WORKERS=${CONNECT_WORKERS:-2}
  CHURN_USERS=20000; CHURN_RATE=200; CHURN_FANOUT=50; CHURN_PER_S=1000; CHURN_SECS=20
  RB_USERS=20000; RB_RATE=200; RB_FANOUT=50; RB_SECS=40; RB_JOIN_AT=8; RB_KILL_AT=20
  DRAIN=5; RB_DRAIN=10
  # 100,000 followers' devices: 8 nodes (12,500 each on average; the ring
  # is uneven and a node refuses beyond 19,500), 8 load generator workers.
  CELEB_USERS=100000; CELEB_NODES=8; CELEB_WORKERS=8; CELEB_RUNS=3
  # Spread over 4 nodes, a node holds 10 sockets per 16 devices (its
  # clients, its relays' dials to owners, and the devices it owns):
  # 20,000 devices stay well under 20,000 open files per node.
  PROXIED_USERS=20000; PROXIED_SETTLE=10
fi
PROXIED_NODES=4
# Throughput and latency run on 2 nodes: every process costs CPU on
# these 2 cores, and 20,000 devices fit in 2. nginx gets as many workers
# as we have nodes, in every scenario.
TP_NODES=2
NGINX_WORKERS=$TP_NODES
TP_RATES="" # from the floor (floor_rates), once it is measured

# Experiments only (the suite's figures use the defaults): another gateway
# binary (a debug build), and the connect scenario's workers and rate.
GATEWAY_BIN=${GATEWAY_BIN:-./target/release/gateway}
CONNECT_RATE=${CONNECT_RATE:-100000}

BENCH=run/bench
RESULTS=bench/results
mkdir -p "$BENCH" "$RESULTS"
rm -rf "${BENCH:?}"/*

log() { echo "bench: $*" >&2; }
die() { log "$*"; exit 1; }

# ---- what we start, and the trap that stops it ------------------------------
ID="bench-$(date +%s)-$$"
VHOST=$ID
KEY="bench:nodes:$ID"
AMQP="amqp://guest:guest@127.0.0.1:5672/$VHOST"
JWT_SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
export JWT_SECRET
declare -A GW_PID=()
VHOST_MADE=""
NCHAN_UP=""
LT_PID=""

cleanup() {
  local rc=$?
  set +e
  [ -n "$LT_PID" ] && kill -TERM "$LT_PID" 2>/dev/null && wait "$LT_PID" 2>/dev/null
  for port in "${!GW_PID[@]}"; do stop_gateway "$port" TERM; done
  [ -n "$NCHAN_UP" ] && bash scripts/nchan.sh stop >/dev/null
  celebrity_cleanup
  [ -n "$VHOST_MADE" ] && rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1
  command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 del "$KEY" >/dev/null 2>&1
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build, services -------------------------------------------------------
log "building (release)"
cargo build --release
bash scripts/services.sh >&2
if [ -n "$NCHAN" ]; then bash scripts/nchan.sh ensure; fi
command -v rabbitmqctl >/dev/null || die "rabbitmqctl is needed (own vhost per run)"
rabbitmqctl -q add_vhost "$VHOST" >/dev/null
VHOST_MADE=1
rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null

http_get() { # url: body on stdout, fails when not 2xx
  python3 - "$1" <<'EOF'
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except Exception:
    sys.exit(1)
EOF
}

ring_members() { # port: distinct owners in the node's ring
  http_get "http://127.0.0.1:$1/v1/ring" | python3 -c 'import json,sys; print(len(set(o for o in json.load(sys.stdin)["owners"] if o)))' 2>/dev/null || echo 0
}

start_gateway() { # port
  local port=$1
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && die "port $port is taken"
  AMQP_URL=$AMQP MEMBERSHIP_KEY=$KEY RUST_LOG=warn \
    "$GATEWAY_BIN" --listen "127.0.0.1:$port" --node-id "bench-$port" \
    --advertise-url "ws://127.0.0.1:$port" >"$BENCH/gateway-$port.log" 2>&1 &
  GW_PID[$port]=$!
}

wait_gateways() { # members, ports...
  local n=$1; shift
  for port in "$@"; do
    for _ in $(seq 1 150); do
      if http_get "http://127.0.0.1:$port/readyz" >/dev/null && [ "$(ring_members "$port")" = "$n" ]; then continue 2; fi
      kill -0 "${GW_PID[$port]}" 2>/dev/null || { tail -n 20 "$BENCH/gateway-$port.log" >&2; die "gateway $port exited"; }
      sleep 0.2
    done
    die "gateway $port not ready with $n members within 30 s"
  done
}

stop_gateway() { # port signal
  local port=$1 sig=$2 pid=${GW_PID[$1]:-}
  [ -n "$pid" ] || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "GW_PID[$port]"
}

start_cluster() { # nodes
  local ports=()
  for i in $(seq 0 $(($1 - 1))); do ports+=($((BASE_PORT + i))); start_gateway $((BASE_PORT + i)); done
  wait_gateways "$1" "${ports[@]}"
  log "gateways up: ${ports[*]} (vhost $VHOST, membership $KEY)"
}

gw_pids() { # the running gateways' pids, comma-separated (their CPU is read from /proc)
  local IFS=,
  echo "${GW_PID[*]}"
}

stop_cluster() {
  for port in "${!GW_PID[@]}"; do stop_gateway "$port" TERM; done
}

start_nchan() { # workers
  stop_nchan
  bash scripts/nchan.sh start --workers "$1" --port "$NCHAN_PORT" >&2
  NCHAN_UP=1
}

stop_nchan() {
  if [ -n "$NCHAN_UP" ]; then bash scripts/nchan.sh stop >/dev/null; fi
  NCHAN_UP=""
}

# ---- one loadtest run --------------------------------------------------------
# lt NAME [--background] ARGS...: runs loadtest with the common flags, the
# JSON report at run/bench/NAME.json and charts in run/bench/NAME/; the
# command (with JWT_SECRET elided) goes to NAME.cmd, the load average to
# NAME.load. Exit code 3 (something lost) is a result, not a failure.
LT_COMMON=(--metrics-listen off --quiet --source-ips "$SOURCE_IPS")
lt_cmd() { # name args...: sets CMD
  local name=$1; shift
  CMD=(./target/release/loadtest run "$@" "${LT_COMMON[@]}" --user-prefix "$ID-$name" --json "$BENCH/$name.json" --charts "$BENCH/$name")
}
lt_prepare() { # name
  uptime >"$BENCH/$1.load"
  printf 'MEMBERSHIP_KEY=%s AMQP_URL=%s JWT_SECRET=... %s\n' "$KEY" "amqp://guest:guest@127.0.0.1:5672/<vhost>" "${CMD[*]}" >"$BENCH/$1.cmd"
}
lt() { # name args...
  local name=$1; shift
  lt_cmd "$name" "$@"
  lt_prepare "$name"
  log "run $name: ${CMD[*]}"
  local rc=0
  MEMBERSHIP_KEY=$KEY AMQP_URL=$AMQP "${CMD[@]}" >"$BENCH/$name.log" 2>&1 || rc=$?
  cat "$BENCH/$name.log" >&2
  if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then die "loadtest $name failed (exit $rc)"; fi
  [ -s "$BENCH/$name.json" ] || die "loadtest $name wrote no report"
}

# Whether a sweep step held its rate: nothing lost, every device connected,
# no publish error, >= 95% of the events published, and >= 90% of the
# nominal deliveries per second. Prints "ok" or why not.
sustained() { # name rate
  python3 - "$BENCH/$1.json" "$2" "$TP_SECS" "$TP_FANOUT" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rate, secs, fanout = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
why = []
if r["messages"]["lost"]: why.append(f"{r['messages']['lost']} lost")
if r["connections"]["failed"]: why.append(f"{r['connections']['failed']} devices failed")
if r.get("publish_errors"): why.append(f"{r['publish_errors']} publish errors")
if r["events_published"] < 0.95 * rate * secs: why.append(f"published {r['events_published'] / secs:.0f} events/s of {rate:.0f}")
if r["deliveries_per_s"] < 0.9 * rate * fanout: why.append(f"delivered {r['deliveries_per_s']:.0f}/s of {rate * fanout:.0f}")
print("; ".join(why) or "ok")
EOF
}

# A top snapshot (second sample of two, 2 s apart) in the middle of a run.
top_during() { # name delay: sets TOP_PID
  ( sleep "$2"; top -b -n 2 -d 2 -w 200 | awk '/^top -/{n++} n==2' | head -n 25 >"$BENCH/$1.top" ) &
  TOP_PID=$!
}

ramp_secs() { # devices: seconds the ramp-up takes at the default connect rate, plus settle
  echo $(( $1 / 5000 + 4 ))
}

# ---- scenarios ---------------------------------------------------------------
if want hold; then
  start_cluster "$HOLD_NODES"
  lt hold-gateway --users "$HOLD_USERS" --workers "$HOLD_WORKERS" --rate 0 --duration "$HOLD_SECS" --settle "$HOLD_SETTLE"
  stop_cluster
  if [ -n "$NCHAN" ]; then
    start_nchan "$HOLD_NGINX_WORKERS"
    lt hold-nchan --target nchan --nchan-url "http://127.0.0.1:$NCHAN_PORT" --nchan-pid-file run/nchan/nginx.pid \
      --users "$HOLD_USERS" --workers "$HOLD_WORKERS" --rate 0 --duration "$HOLD_SECS" --settle "$HOLD_SETTLE"
    stop_nchan
  fi
fi

sweep() { # target-name extra-args...: the rate sweep, best rate in $BENCH/throughput-<t>.best
  local t=$1; shift
  local best=""
  for rate in $TP_RATES; do
    local name="throughput-$t-$rate"
    top_during "$name" $(( $(ramp_secs "$TP_USERS") + TP_SECS / 2 ))
    lt "$name" "$@" --users "$TP_USERS" --rate "$rate" --fanout "$TP_FANOUT" --duration "$TP_SECS" --drain "$DRAIN"
    wait "$TOP_PID" || true # the top snapshot
    verdict=$(sustained "$name" "$rate")
    echo "$verdict" >"$BENCH/$name.verdict"
    if [ "$verdict" = ok ]; then best=$rate; else log "$name did not hold its rate ($verdict): the sweep stops"; break; fi
  done
  echo "$best" >"$BENCH/throughput-$t.best"
}

half_of_best() { # target: half the best zero-loss rate (or half the lowest step)
  local b
  b=$(cat "$BENCH/throughput-$1.best" 2>/dev/null || true)
  [ -n "$b" ] || b=${TP_RATES%% *}
  echo $(( b / 2 ))
}

# A fresh cluster for each run: freed heap stays in a process's RSS, and
# a second run would partly reuse it.
if want proxied; then
  for how in direct spread; do
    start_cluster "$PROXIED_NODES"
    extra=()
    [ "$how" = spread ] && extra=(--spread)
    lt "proxied-$how" "${extra[@]}" --users "$PROXIED_USERS" --rate 0 --duration 2 --settle "$PROXIED_SETTLE"
    stop_cluster
  done
  # All nodes' RSS growth over the devices (a node's own per-connection
  # figure divides by what it holds, relays and owned devices alike).
  python3 - "$BENCH" >"$BENCH/proxied.summary.json" <<'EOF'
import json, sys
out = {}
for how in ("direct", "spread"):
    r = json.load(open(f"{sys.argv[1]}/proxied-{how}.json"))
    grew = sum(g["rss_after_bytes"] - g["rss_before_bytes"] for g in r["gateways"])
    devices = r["connections"]["established"]
    out[how] = {"devices": devices, "failed": r["connections"]["failed"], "nodes": len(r["gateways"]),
                "rss_growth_bytes": grew, "bytes_per_device": grew / max(devices, 1),
                "connect_rate_per_s": r["connect_rate_per_s"]}
json.dump(out, sys.stdout, indent=2)
EOF
  cat "$BENCH/proxied.summary.json" >&2
fi

# The floor (bench/floor): what this machine moves at most with one
# 150-byte write per message per loopback TCP connection, tokio on both
# sides, nothing else. Run with nothing else of ours running, right
# before the sweep, so the ratios compare like with like.
floor() {
  local cmd=(./target/release/floor --connections "$FLOOR_CONNS" --seconds "$FLOOR_SECS")
  uptime >"$BENCH/floor.load"
  echo "${cmd[*]}" >"$BENCH/floor.cmd"
  log "run floor: ${cmd[*]}"
  "${cmd[@]}" >"$BENCH/floor.json" || die "floor failed"
  cat "$BENCH/floor.json" >&2
}

# Events/s at which the deliveries are half the floor's messages/s.
half_of_floor() {
  python3 -c 'import json,sys; f=json.load(open(sys.argv[1])); print(max(1, round(f["messages_per_s"] / 2 / float(sys.argv[2]))))' \
    "$BENCH/floor.json" "$TP_FANOUT"
}

# The sweep's event rates: FLOOR_STEPS x the floor / fanout.
floor_rates() {
  python3 -c 'import json,sys; f=json.load(open(sys.argv[1]))["messages_per_s"]; print(" ".join(str(round(f * float(x) / float(sys.argv[2]))) for x in sys.argv[3].split()))' \
    "$BENCH/floor.json" "$TP_FANOUT" "$FLOOR_STEPS"
}

if want throughput || want latency; then
  if want throughput || [ ! -s "$BENCH/floor.json" ]; then floor; fi
  TP_RATES=$(floor_rates)
  log "sweep steps (events/s x $TP_FANOUT, = $FLOOR_STEPS of the floor): $TP_RATES"
  if want throughput; then
    start_cluster "$TP_NODES"
    sweep gateway --server-pids "$(gw_pids)"
    stop_cluster
    if [ -n "$NCHAN" ]; then
      start_nchan "$NGINX_WORKERS"
      sweep nchan --target nchan --nchan-url "http://127.0.0.1:$NCHAN_PORT"
      stop_nchan
    fi
  fi
  if want latency; then
    # The same rate for both: half the floor (issue 16's target: p99 <=
    # 10 ms there); half our best zero-loss rate if the floor is missing.
    if [ -s "$BENCH/floor.json" ]; then
      LAT_RATE=$(half_of_floor); echo floor >"$BENCH/latency.basis"
    else
      LAT_RATE=$(half_of_best gateway); echo best >"$BENCH/latency.basis"
    fi
    echo "$LAT_RATE" >"$BENCH/latency.rate"
    start_cluster "$TP_NODES"
    lt latency-gateway --server-pids "$(gw_pids)" --users "$TP_USERS" --rate "$LAT_RATE" --fanout "$TP_FANOUT" --duration "$LAT_SECS" --drain "$DRAIN"
    stop_cluster
    if [ -n "$NCHAN" ]; then
      start_nchan "$NGINX_WORKERS"
      lt latency-nchan --target nchan --nchan-url "http://127.0.0.1:$NCHAN_PORT" \
        --users "$TP_USERS" --rate "$LAT_RATE" --fanout "$TP_FANOUT" --duration "$LAT_SECS" --drain "$DRAIN"
      stop_nchan
    fi
  fi
fi

if want connect; then
  start_cluster "$TP_NODES"
  lt connect --users "$CONNECT_USERS" --workers "$CONNECT_WORKERS" --connect-rate "$CONNECT_RATE" --rate 0 --duration 1
  stop_cluster
fi

if want churn; then
  start_cluster "$NODES"
  lt churn --users "$CHURN_USERS" --rate "$CHURN_RATE" --fanout "$CHURN_FANOUT" --churn "$CHURN_PER_S" \
    --duration "$CHURN_SECS" --drain "$DRAIN"
  stop_cluster
fi

if want rebalance; then
  start_cluster "$NODES"
  name=rebalance
  lt_cmd "$name" --users "$RB_USERS" --rate "$RB_RATE" --fanout "$RB_FANOUT" --recover --duration "$RB_SECS" --drain "$RB_DRAIN"
  lt_prepare "$name"
  log "run $name: ${CMD[*]}"
  MEMBERSHIP_KEY=$KEY AMQP_URL=$AMQP "${CMD[@]}" >"$BENCH/$name.log" 2>&1 &
  LT_PID=$!
  t0=$(date +%s.%N)
  # Publishing starts after ramp-up and settle.
  pub=$(ramp_secs "$RB_USERS")
  sleep $((pub + RB_JOIN_AT))
  join_port=$((BASE_PORT + NODES))
  log "rebalance: node $join_port joins"
  t_join=$(date +%s.%N)
  start_gateway "$join_port"
  sleep $((RB_KILL_AT - RB_JOIN_AT))
  kill_port=$BASE_PORT
  log "rebalance: SIGKILL node $kill_port"
  t_kill=$(date +%s.%N)
  kill -KILL "${GW_PID[$kill_port]}"
  wait "${GW_PID[$kill_port]}" 2>/dev/null || true
  unset "GW_PID[$kill_port]"
  rc=0
  wait "$LT_PID" || rc=$?
  LT_PID=""
  cat "$BENCH/$name.log" >&2
  if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then die "loadtest $name failed (exit $rc)"; fi
  python3 -c 'import sys; t0,j,k=map(float,sys.argv[1:]); print(f"{{\"join_s\": {j-t0:.2f}, \"kill_s\": {k-t0:.2f}}}")' "$t0" "$t_join" "$t_kill" >"$BENCH/rebalance.events.json"
  stop_cluster
fi

# ---- celebrity: one post to 100,000 followers through the backend --------------
# Its own backend (release), on its own database (created by the backend,
# dropped at the end), fan-out queue and port; the bench's vhost, membership
# key and JWT secret. Users and follows are bulk-seeded straight into that
# database (loadtest --seed-database: 100,000 argon2 registrations would
# take most of an hour); the post goes through POST /post/create.
CELEB_BACKEND_PORT=$((8192 + PORT_OFFSET))
CELEB_DB="bench_celebrity_$$"
CELEB_DB_URL="postgres://postgres@127.0.0.1:5432/$CELEB_DB"
CELEB_BACKEND_PID=""
celebrity_cleanup() {
  if [ -n "$CELEB_BACKEND_PID" ]; then
    kill -TERM "$CELEB_BACKEND_PID" 2>/dev/null
    wait "$CELEB_BACKEND_PID" 2>/dev/null
    CELEB_BACKEND_PID=""
  fi
  if [ -n "${CELEB_DB_MADE:-}" ]; then
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $CELEB_DB WITH (FORCE)" >/dev/null 2>&1
    CELEB_DB_MADE=""
  fi
}

start_celebrity_backend() {
  (exec 3<>"/dev/tcp/127.0.0.1/$CELEB_BACKEND_PORT") 2>/dev/null && die "port $CELEB_BACKEND_PORT is taken"
  CELEB_DB_MADE=1
  DATABASE_URL=$CELEB_DB_URL AMQP_URL=$AMQP MEMBERSHIP_KEY=$KEY FANOUT_QUEUE="$ID.fanout" RUST_LOG=warn NO_COLOR=1 \
    BACKEND_WORKER_METRICS_LISTEN=127.0.0.1:0 \
    ./target/release/backend --listen "127.0.0.1:$CELEB_BACKEND_PORT" >"$BENCH/celebrity-backend.log" 2>&1 &
  CELEB_BACKEND_PID=$!
  for _ in $(seq 1 150); do
    http_get "http://127.0.0.1:$CELEB_BACKEND_PORT/readyz" >/dev/null && return 0
    kill -0 "$CELEB_BACKEND_PID" 2>/dev/null || { tail -n 20 "$BENCH/celebrity-backend.log" >&2; die "backend exited"; }
    sleep 0.2
  done
  die "backend not ready within 30 s"
}

if want celebrity; then
  start_cluster "$CELEB_NODES"
  start_celebrity_backend
  for i in $(seq 1 "$CELEB_RUNS"); do
    lt "celebrity-$i" --mode e2e --celebrity --users "$CELEB_USERS" --workers "$CELEB_WORKERS" \
      --backend-url "http://127.0.0.1:$CELEB_BACKEND_PORT" --seed-database "$CELEB_DB_URL" --drain 15
  done
  celebrity_cleanup
  stop_cluster
  echo "$CELEB_RUNS" >"$BENCH/celebrity.runs"
fi

# ---- the report ----------------------------------------------------------------
# Charts of the runs shown go under bench/results/<scenario>/.
keep_charts() { # run-name result-dir
  [ -d "$BENCH/$1" ] || return 0
  rm -rf "${RESULTS:?}/$2"
  mkdir -p "$RESULTS/$2"
  cp "$BENCH/$1"/*.svg "$RESULTS/$2/"
}
for n in hold-gateway hold-nchan proxied-direct proxied-spread latency-gateway latency-nchan churn rebalance; do keep_charts "$n" "$n"; done
if [ -s "$BENCH/celebrity.runs" ]; then
  for i in $(seq 1 "$(cat "$BENCH/celebrity.runs")"); do keep_charts "celebrity-$i" "celebrity-$i"; done
fi
for t in gateway nchan; do
  b=$(cat "$BENCH/throughput-$t.best" 2>/dev/null || true)
  if [ -n "$b" ]; then keep_charts "throughput-$t-$b" "throughput-$t"; fi
done

{
  echo "nproc=$(nproc)"
  echo "memory=$(free -b | awk '/^Mem:/{print $2}')"
  echo "kernel=$(uname -srm)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "rustc=$(rustc --version)"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- gateway contract loadtest 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "nofile=$(ulimit -Hn)"
  echo "quick=${QUICK:-0}"
  echo "nodes=$NODES"
  echo "tp_nodes=$TP_NODES"
  echo "hold_nodes=$HOLD_NODES"
  echo "nginx_workers=$NGINX_WORKERS"
  echo "hold_nginx_workers=$HOLD_NGINX_WORKERS"
  echo "tp_rates=$TP_RATES"
  echo "floor_steps=$FLOOR_STEPS"
  echo "tp_fanout=$TP_FANOUT"
} >"$BENCH/machine.env"
python3 bench/report.py "$BENCH" "$RESULTS" "$OUT"
log "wrote $OUT"
