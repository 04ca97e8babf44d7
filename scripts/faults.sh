#!/usr/bin/env bash
# The fault suite (RELIABILITY.md): does the feed lose anything when things
# break? It builds release, starts its OWN RabbitMQ node (later a 3-node
# cluster), Redis and PostgreSQL on other ports with their own data
# directories, 3 gateways and the backend, and runs each case under load
# (target/release/loadtest, devices reconnecting with ?since=), twice.
# It never touches the machine's shared services, and stops only the
# processes it started (by pid), whatever happens.
#
#   scripts/faults.sh                    every case, twice (about 25 minutes)
#   scripts/faults.sh --quick            every case once, smaller and shorter (a few minutes)
#   scripts/faults.sh --only a,b         some cases (names below)
#   scripts/faults.sh --runs N           runs per case (default 2; --quick: 1)
#   scripts/faults.sh --out FILE         write FILE instead of RELIABILITY.md
#   scripts/faults.sh --ci               a short check for scripts/test.sh: gateway-stop-8 and
#                                        redis-restart-4 once each, small; exits 1 if anything is lost
#                                        (writes no RELIABILITY.md)
#   FAULTS_BIN=DIR scripts/faults.sh ... use the gateway, backend and loadtest in DIR, build nothing
#   FAULTS_PORT_OFFSET=N ...            every private port + N (a second suite beside CI's)
#
# Cases:
#   rabbit-restart        the RabbitMQ node stopped and started again
#   rabbit-close-all      every broker connection cut (rabbitmqctl close_all_connections)
#   rabbit-close-gateways only the gateways' broker connections cut
#   redis-restart-4       Redis down ~4 s, then started again (empty: no persistence)
#   redis-restart-10      Redis down ~10 s
#   pg-restart            PostgreSQL restarted during posts (end to end, through the backend)
#   backend-kill          the backend SIGKILLed during posts and started again (end to end)
#   gateway-kill          one gateway SIGKILLed, started again 5 s later
#   gateway-stop-8        one gateway SIGSTOPped 8 s, then SIGCONT
#   gateway-stop-30       one gateway SIGSTOPped 30 s, then SIGCONT
#   rolling               every gateway in turn: SIGTERM, start again, ready, next
#   slow-consumer         devices that never read, next to the normal ones
#   cluster-node-kill     a 3-node RabbitMQ cluster, gateways spread over its nodes; one node
#                         SIGKILLed, started again 10 s later
#
# Raw reports, per-case metadata and logs go to run/faults/ (git-ignored);
# the JSON the tables are made from is copied to bench/reliability/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ALL="rabbit-restart,rabbit-close-all,rabbit-close-gateways,redis-restart-4,redis-restart-10,pg-restart,backend-kill,gateway-kill,gateway-stop-8,gateway-stop-30,rolling,slow-consumer,cluster-node-kill"
QUICK=""
CI=""
ONLY=$ALL
RUNS=""
OUT=RELIABILITY.md
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --ci) CI=1; QUICK=1; ONLY="gateway-stop-8,redis-restart-4"; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "usage: scripts/faults.sh [--quick] [--ci] [--only CASES] [--runs N] [--out FILE]" >&2; exit 2 ;;
  esac
done
for c in ${ONLY//,/ }; do
  [[ ",$ALL," == *",$c,"* ]] || { echo "faults: unknown case $c (cases: $ALL)" >&2; exit 2; }
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
[ -n "$RUNS" ] || RUNS=$([ -n "$QUICK" ] && echo 1 || echo 2)

# ---- sizes -----------------------------------------------------------------
# 6,000 devices over 3 gateways, 150 events/s to 20 recipients each: 6,000
# deliveries/s, enough that every second of a fault holds thousands of
# (event, device) pairs, small enough to leave the 2 cores room for the
# brokers and the faults themselves.
if [ -n "$CI" ]; then
  USERS=600; DEVICES=2; RATE=50; FANOUT=10; DURATION=16; FAULT_AT=3; DRAIN=12
  E2E_USERS=300; E2E_RATE=20; E2E_FANOUT=30
elif [ -n "$QUICK" ]; then
  USERS=1500; DEVICES=2; RATE=100; FANOUT=20; DURATION=16; FAULT_AT=4; DRAIN=10
  E2E_USERS=600; E2E_RATE=30; E2E_FANOUT=30
else
  USERS=3000; DEVICES=2; RATE=150; FANOUT=20; DURATION=20; FAULT_AT=5; DRAIN=10
  E2E_USERS=1500; E2E_RATE=50; E2E_FANOUT=50
fi
# Cases whose fault lasts longer get a longer run: fault, then at least
# 12 s of normal load to show the recovery.
case_duration() {
  case $1 in
    gateway-stop-30) echo $((FAULT_AT + 30 + 15)) ;;
    rolling) echo $((FAULT_AT + 45)) ;;
    redis-restart-10|cluster-node-kill) echo $((DURATION + 8)) ;;
    slow-consumer) echo $((FAULT_AT + 32)) ;;
    *) echo "$DURATION" ;;
  esac
}

# ---- ports and directories (away from the shared 5672/6379/5432) -----------
# FAULTS_PORT_OFFSET=N moves every port (and the RabbitMQ node names), so
# that a second suite can run beside CI's short one on the same machine.
O=${FAULTS_PORT_OFFSET:-0}
RMQ_PORT=($((5680 + O)) $((5681 + O)) $((5682 + O)))
RMQ_DIST=($((25680 + O)) $((25681 + O)) $((25682 + O)))
REDIS_PORT=$((6390 + O))
PG_PORT=$((5440 + O))
GW_PORT=($((8284 + O)) $((8285 + O)) $((8286 + O)))
BACKEND_PORT=$((8290 + O))
SOURCE_IPS=127.0.0.1-127.0.0.8

RUN=$ROOT/run/faults
mkdir -p "$RUN"
rm -rf "${RUN:?}"/*
D=$RUN/data
mkdir -p "$D"
RESULTS=$ROOT/bench/reliability

log() { echo "faults: $(date -u +%H:%M:%S) $*" >&2; }
die() { log "$*"; exit 1; }
now_us() { echo $(($(date +%s%N) / 1000)); }

ID="faults-$(date +%s)-$$"
KEY="faults:nodes:$ID"
JWT_SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
export JWT_SECRET
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/feed"
CLUSTER=""   # set once the 3-node cluster replaced the single node

declare -A GW_PID=()
BACKEND_PID=""
LT_PID=""
SLOW_PID=""
RMQ_UP=()      # node indexes we started
REDIS_UP=""
PG_UP=""

# ---- RabbitMQ: our own node(s) ---------------------------------------------
rmq_dir() { echo "$D/rmq$1"; }
rmq_name() { if [ "$O" = 0 ]; then echo "faults$1@localhost"; else echo "faults$O-$1@localhost"; fi; }
amqp_url() { echo "amqp://guest:guest@127.0.0.1:${RMQ_PORT[$1]}/%2f"; }
# The URL list for a client of node i: its own node first, then the others.
amqp_urls_from() {
  local i=$1 out
  out=$(amqp_url "$i")
  if [ -n "$CLUSTER" ]; then
    for j in 0 1 2; do [ "$j" = "$i" ] || out="$out,$(amqp_url "$j")"; done
  fi
  echo "$out"
}
rmqctl() { # node args...
  local i=$1; shift
  env -i PATH="$PATH" HOME="$(rmq_dir "$i")/home" /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$(rmq_name "$i")" "$@"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
rmq_start() { # node
  local i=$1 dir
  dir=$(rmq_dir "$i")
  mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
  echo '[].' >"$dir/plugins"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "${RMQ_PORT[$i]}" >"$dir/rabbitmq.conf"
  printf 'NODENAME=%s\nERL_EPMD_ADDRESS=127.0.0.1\n' "$(rmq_name "$i")" >"$dir/rabbitmq-env.conf"
  env -i PATH="$PATH" HOME="$dir/home" RABBITMQ_NODENAME="$(rmq_name "$i")" \
    RABBITMQ_NODE_PORT="${RMQ_PORT[$i]}" RABBITMQ_DIST_PORT="${RMQ_DIST[$i]}" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/plugins" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" RABBITMQ_PID_FILE="$dir/node.pid" \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached >>"$dir/start.log" 2>&1
  [[ " ${RMQ_UP[*]} " == *" $i "* ]] || RMQ_UP+=("$i")
  for _ in $(seq 1 300); do
    port_open "${RMQ_PORT[$i]}" && return 0
    sleep 0.1
  done
  die "RabbitMQ node $i did not open port ${RMQ_PORT[$i]} within 30 s (see $dir/log)"
}
rmq_pid() { cat "$(rmq_dir "$1")/node.pid" 2>/dev/null; }
rmq_stop() { # node: graceful stop, KILL if that fails
  local i=$1 pid
  pid=$(rmq_pid "$i")
  rmqctl "$i" stop >/dev/null 2>&1 || true
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  while port_open "${RMQ_PORT[$i]}"; do sleep 0.1; done
}
rmq_kill() { # node: SIGKILL the Erlang VM
  local pid
  pid=$(rmq_pid "$1")
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  while port_open "${RMQ_PORT[$1]}"; do sleep 0.1; done
}

# ---- Redis, PostgreSQL -----------------------------------------------------
redis_start() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$D/redis.pid" --logfile "$D/redis.log" --maxclients 20000 --dir "$D"
  REDIS_UP=1
  for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  die "Redis did not answer on $REDIS_PORT"
}
redis_stop() {
  local pid
  pid=$(cat "$D/redis.pid" 2>/dev/null || true)
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; }
  while port_open "$REDIS_PORT"; do sleep 0.05; done
}
PG_BIN=/usr/lib/postgresql/15/bin
PGRUN=$D/pgrun   # owned by the unprivileged user: data, socket and log
pg() { su faults -c "$*"; }
pg_start() {
  if [ ! -d "$PGRUN/data" ]; then
    # initdb refuses to run as root.
    id faults >/dev/null 2>&1 || useradd -M faults
    mkdir -p "$PGRUN"
    chown faults "$PGRUN"
    pg "$PG_BIN/initdb -D $PGRUN/data -U postgres --auth=trust" >"$D/initdb.log" 2>&1 || die "initdb failed ($D/initdb.log)"
  fi
  pg "$PG_BIN/pg_ctl -D $PGRUN/data -l $PGRUN/pg.log -o '-p $PG_PORT -k $PGRUN -c listen_addresses=127.0.0.1' start -w" >/dev/null \
    || die "PostgreSQL did not start (see $PGRUN/pg.log)"
  PG_UP=1
}
pg_stop() { pg "$PG_BIN/pg_ctl -D $PGRUN/data -m fast stop -w" >/dev/null 2>&1 || true; }

# ---- gateways, backend -----------------------------------------------------
gw_start() { # index
  local i=$1 port=${GW_PORT[$1]} rmq=$1
  [ -n "$CLUSTER" ] || rmq=0
  AMQP_URL=$(amqp_urls_from "$rmq") REDIS_URL=$REDIS_URL MEMBERSHIP_KEY=$KEY RUST_LOG=${FAULTS_GATEWAY_LOG:-warn,gateway=info} NO_COLOR=1 \
    "$BIN/gateway" --node-id "gw$i" --listen "127.0.0.1:$port" --advertise-url "ws://127.0.0.1:$port" \
    >>"$RUN/gw$i.log" 2>&1 &
  GW_PID[$i]=$!
}
gw_ready() { # index: /readyz 200 and a ring of 3
  local port=${GW_PORT[$1]}
  python3 - "$port" <<'EOF'
import json, sys, urllib.request
port = sys.argv[1]
try:
    if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status != 200:
        sys.exit(1)
    ring = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/ring", timeout=1))
    sys.exit(0 if len(set(ring.get("owners", []))) == 3 else 1)
except Exception:
    sys.exit(1)
EOF
}
all_ready() { for i in 0 1 2; do gw_ready "$i" || return 1; done; }
wait_all_ready() { # timeout_s: seconds it took, or fails
  local t0 limit=$1
  t0=$(date +%s%N)
  until all_ready; do
    [ $(( ($(date +%s%N) - t0) / 1000000000 )) -lt "$limit" ] || return 1
    sleep 0.2
  done
  echo $(( ($(date +%s%N) - t0) / 1000000 ))
}
gw_stop() { # index [signal]
  local i=$1 sig=${2:-TERM} pid=${GW_PID[$1]:-}
  [ -n "$pid" ] || return 0
  kill -CONT "$pid" 2>/dev/null || true
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "GW_PID[$i]"
}
backend_start() {
  AMQP_URL=$(amqp_urls_from 0) REDIS_URL=$REDIS_URL DATABASE_URL=$DATABASE_URL MEMBERSHIP_KEY=$KEY \
    FANOUT_QUEUE="faults.fanout" ARGON2_MEMORY_KIB=64 ARGON2_ITERATIONS=1 RUST_LOG=warn NO_COLOR=1 \
    "$BIN/backend" --listen "127.0.0.1:$BACKEND_PORT" >>"$RUN/backend.log" 2>&1 &
  BACKEND_PID=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$BACKEND_PORT/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$BACKEND_PID" 2>/dev/null || die "the backend exited at start (see $RUN/backend.log)"
    sleep 0.1
  done
  die "the backend did not answer within 30 s"
}
backend_stop() { # [signal]
  local sig=${1:-TERM}
  [ -n "$BACKEND_PID" ] || return 0
  kill -"$sig" "$BACKEND_PID" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$BACKEND_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$BACKEND_PID" 2>/dev/null || true
  wait "$BACKEND_PID" 2>/dev/null || true
  BACKEND_PID=""
}

cleanup() {
  local rc=$?
  set +e
  [ -n "$LT_PID" ] && kill -TERM "$LT_PID" 2>/dev/null && wait "$LT_PID" 2>/dev/null
  [ -n "$SLOW_PID" ] && kill -TERM "$SLOW_PID" 2>/dev/null
  for i in "${!GW_PID[@]}"; do gw_stop "$i" TERM; done
  backend_stop TERM
  [ -n "$PG_UP" ] && pg_stop
  [ -n "$REDIS_UP" ] && redis_stop
  for i in "${RMQ_UP[@]}"; do rmq_stop "$i"; done
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build, start ----------------------------------------------------------
for c in rabbitmqctl redis-server redis-cli curl python3; do
  command -v $c >/dev/null || die "$c is needed"
done
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || die "/usr/lib/rabbitmq/bin/rabbitmq-server is needed"
for p in "${RMQ_PORT[@]}" "${RMQ_DIST[@]}" "$REDIS_PORT" "$PG_PORT" "${GW_PORT[@]}" "$BACKEND_PORT"; do
  port_open "$p" && die "port $p is taken: another faults.sh running?"
done
if [ -n "$CI" ]; then
  # CI has just built the debug binaries for the tests (FAULTS_BIN: others).
  BIN=${FAULTS_BIN:-target/debug}
  log "building (debug, for --ci)"
  [ -n "${FAULTS_BIN:-}" ] || cargo build -q -p gateway -p backend -p loadtest
elif [ -n "${FAULTS_BIN:-}" ]; then
  BIN=$FAULTS_BIN   # binaries built elsewhere (gateway, backend, loadtest): nothing is built
else
  BIN=target/release
  log "building (release)"
  cargo build --release -q -p gateway -p backend -p loadtest
fi

log "starting RabbitMQ (node $(rmq_name 0) on ${RMQ_PORT[0]}), Redis ($REDIS_PORT)"
rmq_start 0
redis_start
if want pg-restart || want backend-kill; then
  log "starting PostgreSQL ($PG_PORT)"
  pg_start
fi
for i in 0 1 2; do gw_start "$i"; done
wait_all_ready 60 >/dev/null || die "the gateways were not ready within 60 s (see $RUN/gw*.log)"
if want pg-restart || want backend-kill; then backend_start; fi

{
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "cores=$(nproc)"
  echo "mem_gib=$(awk '/MemTotal/ {printf "%.1f", $2/1048576}' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "rabbitmq=$(rmqctl 0 version 2>/dev/null || echo '?')"
  echo "redis=$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  echo "postgres=$($PG_BIN/postgres --version | awk '{print $3}')"
  echo "rustc=$(rustc --version)"
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!RELIABILITY.md' ':!bench/reliability' || echo '+dirty')"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "users=$USERS"; echo "devices=$DEVICES"; echo "rate=$RATE"; echo "fanout=$FANOUT"
  echo "e2e_users=$E2E_USERS"; echo "e2e_rate=$E2E_RATE"; echo "e2e_fanout=$E2E_FANOUT"
  echo "runs=$RUNS"; echo "quick=$QUICK"; echo "ci=$CI"; echo "bin=$BIN"
  echo "duration=$DURATION"; echo "fault_at=$FAULT_AT"; echo "drain=$DRAIN"
} >"$RUN/machine.env"

# ---- faults ----------------------------------------------------------------
FAULT_START_US=0
FAULT_END_US=0
FAULT_NOTE=""
begin() { FAULT_START_US=$(now_us); }
end() { FAULT_END_US=$(now_us); }

# The gateways' broker connections: those whose client port belongs to a
# gateway process.
gateway_connections() {
  local ports pid
  ports=""
  for pid in "${GW_PID[@]}"; do
    ports="$ports $(ss -tnpH state established "( dport = :${RMQ_PORT[0]} )" 2>/dev/null \
      | grep "pid=$pid," | awk '{print $3}' | sed 's/.*://')"
  done
  rmqctl 0 list_connections pid peer_port 2>/dev/null | while read -r cpid cport; do
    for p in $ports; do [ "$p" = "$cport" ] && echo "$cpid"; done
  done
}

fault() { # case
  case $1 in
    rabbit-restart)
      begin; rmq_stop 0; rmq_start 0; end ;;
    rabbit-close-all)
      begin; rmqctl 0 close_all_connections "faults: close_all_connections" >/dev/null; end ;;
    rabbit-close-gateways)
      begin
      local n=0 conn
      for conn in $(gateway_connections); do
        rmqctl 0 close_connection "$conn" "faults: gateway connection cut" >/dev/null && n=$((n + 1))
      done
      FAULT_NOTE="$n gateway connections closed"
      end ;;
    redis-restart-4) begin; redis_stop; sleep 4; redis_start; end ;;
    redis-restart-10) begin; redis_stop; sleep 10; redis_start; end ;;
    pg-restart) begin; pg_stop; sleep 3; pg_start; end ;;
    backend-kill) begin; backend_stop KILL; sleep 1; backend_start; end ;;
    gateway-kill) begin; gw_stop 1 KILL; sleep 5; gw_start 1; end ;;
    gateway-stop-8) begin; kill -STOP "${GW_PID[1]}"; sleep 8; kill -CONT "${GW_PID[1]}"; end ;;
    gateway-stop-30) begin; kill -STOP "${GW_PID[1]}"; sleep 30; kill -CONT "${GW_PID[1]}"; end ;;
    rolling)
      begin
      for i in 0 1 2; do
        gw_stop "$i" TERM
        gw_start "$i"
        local t=0
        until gw_ready "$i"; do sleep 0.2; t=$((t + 1)); [ $t -lt 150 ] || break; done
        sleep 5
      done
      end ;;
    slow-consumer)
      # A firehose of its own (10 users, 800 events/s each to all of them:
      # 8,000 deliveries/s) whose users also have devices that never read:
      # their gateway must close those (4008) while the users' normal
      # devices, and the main run's, lose nothing.
      begin
      local sp="${PREFIX}s"
      rm -f "$RUN/$NAME.slow.ready"
      python3 bench/faults/slow_consumer.py --secret "$JWT_SECRET" --prefix "$sp" --users 10 --per-user 2 \
        --gateways "${GW_PORT[*]}" --hold 25 --ready-file "$RUN/$NAME.slow.ready" \
        >"$RUN/$NAME.slow.json" 2>>"$RUN/$NAME.slow.log" &
      SLOW_PID=$!
      until [ -f "$RUN/$NAME.slow.ready" ] || ! kill -0 "$SLOW_PID" 2>/dev/null; do sleep 0.1; done
      "$BIN/loadtest" run --users 10 --devices 1 --rate 800 --fanout 10 --duration 15 --drain 5 --recover \
        --settle 1 --redis-url "$REDIS_URL" --membership-key "$KEY" --amqp-url "$(amqp_urls_from 0)" \
        --user-prefix "$sp" --metrics-listen off --quiet --json "$RUN/$NAME.firehose.json" \
        --charts "$RUN/$NAME.firehose.charts" >"$RUN/$NAME.firehose.out" 2>&1 || true
      wait "$SLOW_PID" || true
      SLOW_PID=""
      end ;;
    cluster-node-kill) begin; rmq_kill 1; sleep 10; rmq_start 1; end ;;
  esac
}

# Switches from the single node to a 3-node cluster (fresh nodes), with
# gateway i on node i and the others listed after it.
to_cluster() {
  log "replacing the single RabbitMQ node with a 3-node cluster (${RMQ_PORT[*]})"
  for i in "${!GW_PID[@]}"; do gw_stop "$i" TERM; done
  backend_stop TERM
  rmq_stop 0
  rm -rf "$(rmq_dir 0)" "$(rmq_dir 1)" "$(rmq_dir 2)"
  rmq_start 0
  for i in 1 2; do
    mkdir -p "$(rmq_dir "$i")/home"
    install -m 400 "$(rmq_dir 0)/home/.erlang.cookie" "$(rmq_dir "$i")/home/.erlang.cookie"
    rmq_start "$i"
    rmqctl "$i" stop_app >/dev/null
    rmqctl "$i" join_cluster "$(rmq_name 0)" >/dev/null
    rmqctl "$i" start_app >/dev/null
  done
  rmqctl 0 cluster_status >"$RUN/cluster_status.txt" 2>&1 || true
  CLUSTER=1
  for i in 0 1 2; do gw_start "$i"; done
  wait_all_ready 60 >/dev/null || die "the gateways were not ready on the cluster within 60 s"
}

LOGS=("$RUN/gw0.log" "$RUN/gw1.log" "$RUN/gw2.log" "$RUN/backend.log")
log_offsets() { for f in "${LOGS[@]}"; do [ -f "$f" ] && stat -c %s "$f" || echo 0; done; }

LOST_TOTAL=0
run_case() { # case run
  NAME="$1-$2"
  local c=$1 dur mode=gateway users=$USERS devices=$DEVICES rate=$RATE fanout=$FANOUT
  dur=$(case_duration "$c")
  PREFIX="f$(date +%s)$2${c//-/}"
  local extra=()
  case $c in
    pg-restart|backend-kill)
      mode=e2e; users=$E2E_USERS; rate=$E2E_RATE; fanout=$E2E_FANOUT
      extra=(--mode e2e --backend-url "http://127.0.0.1:$BACKEND_PORT") ;;
  esac
  # Start from a healthy cluster: every gateway ready in a ring of 3.
  if ! wait_all_ready 60 >/dev/null; then
    log "$NAME: the gateways are not all ready before the case; restarting them"
    for i in 0 1 2; do gw_stop "$i" KILL; gw_start "$i"; done
    wait_all_ready 60 >/dev/null || die "$NAME: the gateways did not come back"
  fi
  mapfile -t offsets < <(log_offsets)
  local cmd=("$BIN/loadtest" run --users "$users" --devices "$devices" --rate "$rate" --fanout "$fanout"
    --duration "$dur" --drain "$DRAIN" --recover --settle 1 --source-ips "$SOURCE_IPS"
    --redis-url "$REDIS_URL" --membership-key "$KEY" --amqp-url "$(amqp_urls_from 0)"
    --user-prefix "$PREFIX" --metrics-listen off --quiet
    --started-file "$RUN/$NAME.started" --json "$RUN/$NAME.json" --charts "$RUN/$NAME.charts" "${extra[@]}")
  echo "JWT_SECRET=... ${cmd[*]}" >"$RUN/$NAME.cmd"
  log "$NAME: $mode mode, $((users * devices)) devices, $rate events/s x $fanout, ${dur}s"
  # Devices that miss something are written there (user, missed, received, timeline).
  LOADTEST_LOSS_LOG="$RUN/$NAME.losses.jsonl" "${cmd[@]}" >"$RUN/$NAME.out" 2>"$RUN/$NAME.err" &
  LT_PID=$!
  local waited=0
  until [ -f "$RUN/$NAME.started" ]; do
    kill -0 "$LT_PID" 2>/dev/null || break
    sleep 0.1; waited=$((waited + 1))
    [ $waited -lt 1800 ] || break
  done
  sleep "$FAULT_AT"
  FAULT_NOTE=""
  fault "$c"
  local rc=0
  wait "$LT_PID" || rc=$?
  LT_PID=""
  # Came back by itself: every gateway ready in a ring of 3 again, with
  # nothing done beyond undoing the fault.
  local healed_ms back=True
  healed_ms=$(wait_all_ready 30) || { back=False; healed_ms=None; }
  local i=0 warn="$RUN/$NAME.warn"
  : >"$warn"
  for f in "${LOGS[@]}"; do
    if [ -f "$f" ]; then
      tail -c +"$((offsets[i] + 1))" "$f" | grep -E ' (WARN|ERROR) |panicked' | sed "s|^|$(basename "$f" .log): |" >>"$warn" || true
    fi
    i=$((i + 1))
  done
  python3 - "$RUN/$NAME.meta.json" <<EOF
import json, sys
json.dump({"case": "$c", "run": $2, "mode": "$mode", "exit_code": $rc,
           "fault_start_us": $FAULT_START_US, "fault_end_us": $FAULT_END_US, "note": "$FAULT_NOTE",
           "back_by_itself": $back, "ready_after_run_ms": $healed_ms, "cluster": bool("$CLUSTER")},
          open(sys.argv[1], "w"))
EOF
  local lost
  lost=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['messages']['lost'])" "$RUN/$NAME.json" 2>/dev/null || echo unknown)
  log "$NAME: exit $rc, lost $lost, $(wc -l <"$warn") WARN+ log lines, back by itself: $back"
  if [ "$lost" != 0 ]; then LOST_TOTAL=$((LOST_TOTAL + 1)); fi
}

for c in ${ALL//,/ }; do
  want "$c" || continue
  if [ "$c" = cluster-node-kill ]; then to_cluster; fi
  for k in $(seq 1 "$RUNS"); do run_case "$c" "$k"; done
done

if [ -n "$CI" ]; then
  [ "$LOST_TOTAL" = 0 ] || die "$LOST_TOTAL run(s) lost events (or gave no report); see $RUN"
  log "ci: nothing lost"
  exit 0
fi
mkdir -p "$RESULTS"
python3 bench/faults/report.py "$RUN" "$RESULTS" "$OUT"
log "wrote $OUT (raw JSON in ${RESULTS#"$ROOT"/}/)"
