#!/usr/bin/env bash
# Checks every Grafana panel against a real Prometheus (Debian's package)
# scraping a real stack: a private RabbitMQ node with its rabbitmq_prometheus
# plugin, the backend, 3 gateways, the Redis and PostgreSQL exporters and a
# short load run during which one gateway is SIGKILLed. Then every query of
# every panel of grafana/dashboards/*.json (template variables substituted)
# is evaluated at an instant during the load run, after the kill and the
# survivors' take-over; the check fails on any query that errors or returns
# nothing. What each panel's queries returned at that instant is written to
# grafana/PANELS.md (dashboard, panel, query, values), so the figures of a
# load run with a node killed are on record next to the dashboards.
#
#   scripts/check-panels.sh            (debug build; about 2.5 minutes)
#   PANELS_OUT=/tmp/p.md scripts/check-panels.sh   (write the table elsewhere)
#
# It never touches the shared services' configuration: RabbitMQ is a node
# of its own on free ports; Redis and PostgreSQL are only used (a membership
# key and a database of its own, dropped at the end). Everything it starts
# it stops by pid and waits for: the RabbitMQ node by the pid in its pid
# file (its epmd may serve other nodes and is left alone).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "check-panels: FAILED: $*" >&2; exit 1; }
say() { echo "check-panels: $*"; }

need_apt() { # command package
  command -v "$1" >/dev/null && return 0
  say "installing $2 (Debian)"
  { apt-get install -y --no-install-recommends "$2" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$2" >/dev/null; }; } \
    || die "apt-get install $2 failed"
}
need_apt prometheus prometheus
need_apt prometheus-redis-exporter prometheus-redis-exporter
need_apt prometheus-postgres-exporter prometheus-postgres-exporter
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || die "RabbitMQ is not installed (scripts/services.sh installs it)"

cargo build --quiet -p backend -p gateway -p loadtest
BIN=target/debug

D=$(mktemp -d /tmp/feedgate-panels.XXXXXX)
PIDS=()
NODE="panels$$@localhost"
DB="feed_panels_$$"
KEY="panels:$$:nodes"
RMQ_ENV=(HOME="$D/rmq/home")
# Stops a process by pid: TERM, up to $2 seconds for it to go, then KILL;
# reaped when it is this shell's child.
stop_pid() { # pid seconds
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 $(($2 * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "check-panels: pid $pid still running after $2 s: KILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  # Last started first: the traffic and the load run before what they use.
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}" 15; done
  # The RabbitMQ node: asked to stop, then by the pid it wrote.
  if [ -s "$D/rmq/node.pid" ]; then
    local rmq_pid
    rmq_pid=$(cat "$D/rmq/node.pid")
    timeout 30 env "${RMQ_ENV[@]}" rabbitmqctl -n "$NODE" stop >/dev/null 2>&1
    stop_pid "$rmq_pid" 20
    kill -0 "$rmq_pid" 2>/dev/null && echo "check-panels: the RabbitMQ node (pid $rmq_pid) did not stop" >&2
  fi
  redis-cli del "$KEY" >/dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  if [ "$rc" = 0 ]; then rm -rf "$D"; else echo "check-panels: logs kept in $D" >&2; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { # url seconds what
  for _ in $(seq 1 $(($2 * 4))); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.25; done
  die "$3 did not answer at $1 within $2 s"
}
start() { # log, command...
  local log=$1; shift
  "$@" >"$D/$log.log" 2>&1 &
  PIDS+=($!)
}

# --- A private RabbitMQ node with the Prometheus plugin ---------------------
AMQP_PORT=$(free_port); DIST_PORT=$(free_port); RMQ_PROM_PORT=$(free_port)
mkdir -p "$D/rmq/home" "$D/rmq/mnesia" "$D/rmq/log"
echo "[rabbitmq_prometheus]." > "$D/rmq/plugins"
cat > "$D/rmq/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$AMQP_PORT
loopback_users = none
prometheus.tcp.port = $RMQ_PROM_PORT
prometheus.tcp.ip = 127.0.0.1
EOF
printf 'NODENAME=%s\nERL_EPMD_ADDRESS=127.0.0.1\n' "$NODE" > "$D/rmq/rabbitmq-env.conf"
say "starting RabbitMQ node $NODE on $AMQP_PORT (metrics on $RMQ_PROM_PORT)"
# From inside $D: Erlang writes crash dumps (MnesiaCore.*) into its working directory.
(cd "$D" && env HOME="$D/rmq/home" RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
  RABBITMQ_MNESIA_BASE="$D/rmq/mnesia" RABBITMQ_LOG_BASE="$D/rmq/log" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$D/rmq/plugins" RABBITMQ_CONFIG_FILE="$D/rmq/rabbitmq.conf" \
  RABBITMQ_CONF_ENV_FILE="$D/rmq/rabbitmq-env.conf" RABBITMQ_PID_FILE="$D/rmq/node.pid" \
  /usr/lib/rabbitmq/bin/rabbitmq-server -detached)
wait_http "http://127.0.0.1:$RMQ_PROM_PORT/metrics" 60 "RabbitMQ's metrics endpoint"
[ -s "$D/rmq/node.pid" ] || die "the RabbitMQ node wrote no pid file ($D/rmq/node.pid): it could not be stopped by pid"
say "RabbitMQ node up, pid $(cat "$D/rmq/node.pid")"
AMQP="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"

# --- The stack ---------------------------------------------------------------
export JWT_SECRET="check-panels-secret-$$-0123456789"
export REDIS_URL=redis://127.0.0.1:6379 MEMBERSHIP_KEY="$KEY" AMQP_URL="$AMQP" RUST_LOG=warn
B_PORT=$(free_port)
start backend env DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" ARGON2_MEMORY_KIB=1024 ARGON2_ITERATIONS=1 \
  "$BIN/backend" --listen "127.0.0.1:$B_PORT"
G_PORTS=()
for i in 1 2 3; do
  p=$(free_port); G_PORTS+=("$p")
  start "gateway-$i" "$BIN/gateway" --listen "127.0.0.1:$p" --node-id "panels-gw-$i" --advertise-url "ws://127.0.0.1:$p"
done
for p in "${G_PORTS[@]}"; do wait_http "http://127.0.0.1:$p/readyz" 60 "gateway :$p"; done
wait_http "http://127.0.0.1:$B_PORT/readyz" 60 "backend"
REDIS_EXP_PORT=$(free_port); PG_EXP_PORT=$(free_port); LT_PORT=$(free_port); PROM_PORT=$(free_port)
start redis-exporter prometheus-redis-exporter --web.listen-address="127.0.0.1:$REDIS_EXP_PORT" --redis.addr=redis://127.0.0.1:6379
start postgres-exporter env DATA_SOURCE_NAME="postgresql://postgres@127.0.0.1:5432/$DB?sslmode=disable" \
  prometheus-postgres-exporter --web.listen-address="127.0.0.1:$PG_EXP_PORT"

# Prometheus: the same job names and node labels as prometheus/prometheus.yml,
# with this run's addresses, and the same alert rules.
cat > "$D/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["$PWD/prometheus/alerts.yml"]
scrape_configs:
  - job_name: backend
    static_configs: [{targets: ["127.0.0.1:$B_PORT"], labels: {node: backend}}]
  - job_name: gateway
    static_configs:
      - {targets: ["127.0.0.1:${G_PORTS[0]}"], labels: {node: panels-gw-1}}
      - {targets: ["127.0.0.1:${G_PORTS[1]}"], labels: {node: panels-gw-2}}
      - {targets: ["127.0.0.1:${G_PORTS[2]}"], labels: {node: panels-gw-3}}
  - job_name: loadtest
    static_configs: [{targets: ["127.0.0.1:$LT_PORT"]}]
  - job_name: rabbitmq
    static_configs: [{targets: ["127.0.0.1:$RMQ_PROM_PORT"]}]
  - job_name: rabbitmq-queues
    metrics_path: /metrics/detailed
    params: {family: [queue_coarse_metrics, queue_metrics]}
    static_configs: [{targets: ["127.0.0.1:$RMQ_PROM_PORT"]}]
  - job_name: redis
    static_configs: [{targets: ["127.0.0.1:$REDIS_EXP_PORT"]}]
  - job_name: postgres
    static_configs: [{targets: ["127.0.0.1:$PG_EXP_PORT"]}]
EOF
start prometheus prometheus --config.file="$D/prometheus.yml" --storage.tsdb.path="$D/prom" \
  --web.listen-address="127.0.0.1:$PROM_PORT"
wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 30 "Prometheus"

# --- Traffic: API calls through the backend, and a load run with a kill -----
API="http://127.0.0.1:$B_PORT"
json() { python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
register() {
  curl -fsS "$API/user/register" -H 'content-type: application/json' \
    -d "{\"first_name\":\"$1\",\"second_name\":\"Panel\",\"birthdate\":\"1990-01-01\",\"biography\":\"-\",\"city\":\"X\",\"password\":\"pw-$1\"}" | json user_id
}
login() { curl -fsS "$API/login" -H 'content-type: application/json' -d "{\"id\":\"$1\",\"password\":\"pw-$2\"}" | json token; }
A=$(register alice); BOB=$(register bob)
A_TOK=$(login "$A" alice); B_TOK=$(login "$BOB" bob)
curl -fsS -X PUT "$API/friend/set/$A" -H "Authorization: Bearer $B_TOK" >/dev/null
api_traffic() { # posts from Alice, feed reads by Bob, a 404, for a while
  for i in $(seq 1 "$1"); do
    curl -fsS "$API/post/create" -H "Authorization: Bearer $A_TOK" -H 'content-type: application/json' \
      -d "{\"text\":\"panel check $i\"}" >/dev/null || true
    curl -fsS "$API/post/feed?offset=0&limit=10" -H "Authorization: Bearer $B_TOK" >/dev/null || true
    curl -sS -o /dev/null "$API/user/get/nobody-$i" || true
    sleep 0.2
  done
}
api_traffic 150 &
PIDS+=($!)

say "load run: 4,000 devices on 3 gateways, 100 events/s x 20 recipients for 40 s; gateway 3 SIGKILLed mid-run"
"$BIN/loadtest" run --users 4000 --rate 100 --fanout 20 --duration 40 --drain 3 --recover --quiet \
  --metrics-listen "127.0.0.1:$LT_PORT" --json "$D/report.json" >"$D/loadtest.log" 2>&1 &
LT_PID=$!
PIDS+=($LT_PID)
# Wait on conditions, read from Prometheus itself: the devices connected and
# deliveries flowing, then the kill, then the survivors owning every slot.
prom_wait() { # query, python condition on v, seconds, what
  python3 - "$PROM_PORT" "$1" "$2" "$3" "$4" <<'PY' || die "$4: not seen within $3 s"
import json, sys, time, urllib.parse, urllib.request
port, query, cond, secs, what = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
deadline = time.time() + secs
last = None
while time.time() < deadline:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        r = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
        if r:
            last = float(r[0]["value"][1])
            if eval(cond, {"v": last}):
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
print(f"check-panels: {query} was {last} at the end", file=sys.stderr)
sys.exit(1)
PY
}
prom_wait 'sum(loadtest_connections)' 'v >= 3900' 90 "4,000 load-test devices connected"
prom_wait 'sum(rate(gateway_deliveries_total{result="sent"}[5s]))' 'v > 500' 60 "deliveries flowing"
kill -KILL "${PIDS[3]}"   # gateway 3 (backend, gateway-1, gateway-2, gateway-3 were started in that order)
KILL_AT=$(date +%s)
say "gateway 3 killed at $(date +%T)"
prom_wait 'up{job="gateway", node="panels-gw-3"}' 'v == 0' 20 "the killed gateway's target down"
prom_wait 'sum(gateway_owned_slots{node!="panels-gw-3"})' 'v == 1024' 30 "the survivors owning all 1024 slots"
prom_wait 'sum(loadtest_connections)' 'v >= 3900' 30 "the devices back on the survivors"
EVAL_AT=$(date +%s)       # during the run, after the kill: every panel should show something
wait "$LT_PID" || say "loadtest exited $? (its loss figures are not what this checks; see $D/loadtest.log)"

# --- Evaluate every panel ----------------------------------------------------
OUT=${PANELS_OUT:-grafana/PANELS.md}
python3 - "$PROM_PORT" "$EVAL_AT" "$KILL_AT" "$OUT" <<'PY'
import datetime, glob, json, sys, urllib.parse, urllib.request
port, at, kill_at, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
subst = {"$node": ".*", "$__rate_interval": "15s", "$__range": "2m", "$__interval": "5s"}
failed, rows, table = [], [], []
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels") or [])
for path in sorted(glob.glob("grafana/dashboards/*.json")):
    board = json.load(open(path))
    for p in panels(board["panels"]):
        for t in p.get("targets") or []:
            q = t["expr"]
            for k in sorted(subst, key=len, reverse=True):
                q = q.replace(k, subst[k])
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q, "time": at})
            try:
                res = json.load(urllib.request.urlopen(url, timeout=10))
            except Exception as e:
                failed.append(f"{board['title']} / {p['title']} / {t['refId']}: {e}")
                table.append(f"| {board['title']} | {p['title']} | `{q}` | **{e}** |")
                continue
            data = res.get("data", {}).get("result", [])
            cell = lambda v: v.replace("|", "\\|").replace("\n", " ")
            if res.get("status") != "success" or not data:
                failed.append(f"{board['title']} / {p['title']} / {t['refId']}: {res.get('error') or 'no data'} ({q})")
                table.append(f"| {board['title']} | {cell(p['title'])} | `{cell(q)}` | **{cell(res.get('error') or 'no data')}** |")
                continue
            shown = []
            for r in sorted(data, key=lambda r: sorted(r["metric"].items())):
                m = {k: v for k, v in r["metric"].items() if k not in ("__name__", "job", "instance")}
                label = ",".join(f"{v}" for v in m.values())
                shown.append(f"{label + '=' if label else ''}{float(r['value'][1]):.4g}")
            table.append(f"| {board['title']} | {cell(p['title'])} | `{cell(q)}` | {cell('; '.join(shown))} |")
            vals = []
            for r in data[:4]:
                m = {k: v for k, v in r["metric"].items() if k not in ("__name__", "job", "instance")}
                label = ",".join(f"{v}" for v in m.values())
                vals.append(f"{label + '=' if label else ''}{float(r['value'][1]):.4g}")
            more = f" (+{len(data) - 4})" if len(data) > 4 else ""
            rows.append(f"{board['title']} | {p['title']} | {t.get('legendFormat') or t['refId']} | {'; '.join(vals)}{more}")
print("\n".join(rows))
when = datetime.datetime.fromtimestamp(int(at), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
with open(out, "w") as f:
    f.write("# What every panel showed\n\n"
            "Written by `scripts/check-panels.sh` (do not edit): every query of every panel of "
            "grafana/dashboards/*.json, evaluated by a real Prometheus (Debian's package, 1 s scrapes) at one "
            "instant of a load run: 4,000 devices on 3 gateways, 100 events/s x 20 recipients, API traffic "
            "through the backend, gateway 3 (`panels-gw-3`) SIGKILLed mid-run. The instant is after its target "
            f"went down, the survivors owned all 1024 slots and the devices were back: {when}, "
            f"{int(at) - int(kill_at)} s after the kill. Template variables: `$node` = all, "
            "`$__rate_interval` = 15s, `$__range` = 2m. Values: one per series (its labels, then the value).\n\n"
            f"{len(table)} queries, {len(failed)} without data.\n\n"
            "| Dashboard | Panel | Query | Values |\n|---|---|---|---|\n")
    f.write("\n".join(table) + "\n")
print(f"\ncheck-panels: what every panel showed is in {out}")
if failed:
    print("\ncheck-panels: queries that returned nothing or an error:", file=sys.stderr)
    for f in failed:
        print(f"  {f}", file=sys.stderr)
    sys.exit(1)
print(f"\ncheck-panels: {len(rows)} queries, every one answered with data")
PY
say "OK"
