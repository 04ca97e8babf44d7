#!/usr/bin/env bash
# nginx + Nchan, the benchmark peer (see bench/nchan/nginx.conf).
#
#   scripts/nchan.sh ensure                       install nginx and libnginx-mod-nchan (apt) when missing
#   scripts/nchan.sh start [--workers N] [--port P]   our own nginx master on 127.0.0.1:P (default 8090, 2 workers)
#   scripts/nchan.sh stop                         stop it (graceful, then KILL after 10 s)
#   scripts/nchan.sh status                       running or not; Nchan's counters
#
# Everything lives in run/nchan/ (git-ignored): the generated nginx.conf,
# nginx.pid, error.log and nginx's temp directories. The system nginx
# service is never used; the install leaves it stopped and disabled so it
# does not hold port 80.
# Environment: NCHAN_RUN_DIR overrides run/nchan/ (tests use their own),
# NCHAN_SHM the size of Nchan's shared memory (default 256M: unbuffered
# messages stay there 10 s after publication, about 0.5 KB per delivery, so
# 256M holds about 50k deliveries/s; pages count in RSS only once used).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TEMPLATE=$ROOT/bench/nchan/nginx.conf
RUN=${NCHAN_RUN_DIR:-$ROOT/run/nchan}
PIDFILE=$RUN/nginx.pid
MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so
NGINX=/usr/sbin/nginx
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

die() { echo "nchan: $*" >&2; exit 1; }

installed() { [ -x "$NGINX" ] && [ -f "$MODULE" ]; }

# Debian starts and enables nginx.service on install; it would hold port 80
# and be restarted at boot. Stop and disable it (ours never uses it).
quiet_system_nginx() {
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
  else
    command -v update-rc.d >/dev/null && $SUDO update-rc.d nginx disable >/dev/null 2>&1 || true
    if [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
      $SUDO "$NGINX" -s quit >/dev/null 2>&1 || $SUDO kill -QUIT "$(cat /run/nginx.pid)" || true
    fi
  fi
}

ensure() {
  if installed; then
    return 0
  fi
  command -v apt-get >/dev/null || die "nginx/libnginx-mod-nchan missing and apt-get is not available; install them by hand"
  echo "nchan: installing nginx libnginx-mod-nchan with apt" >&2
  local pkgs=(nginx libnginx-mod-nchan)
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o Dpkg::Options::=--force-confold "${pkgs[@]}" >/dev/null; then
    echo "nchan: install failed; running apt-get update and retrying" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o Dpkg::Options::=--force-confold "${pkgs[@]}" >/dev/null
  fi
  quiet_system_nginx
  installed || die "installed the packages but $NGINX or $MODULE is still missing"
}

running_pid() { # prints the master's pid if it runs
  [ -s "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null || return 1
  # Make sure the pid is an nginx master, not a recycled pid.
  grep -q '^nginx' "/proc/$pid/comm" 2>/dev/null || return 1
  echo "$pid"
}

answers() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /healthz HTTP/1.0\r\nHost: nchan\r\n\r\n' >&3 && head -n 1 <&3 | grep -q ' 200 ') 2>/dev/null
}

start() {
  local workers=2 port=8090
  while [ $# -gt 0 ]; do
    case $1 in
      --workers) workers=${2:?--workers N}; shift 2 ;;
      --port) port=${2:?--port P}; shift 2 ;;
      *) die "start: unknown argument $1 (want --workers N --port P)" ;;
    esac
  done
  [[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, not $workers"
  [[ $port =~ ^[1-9][0-9]*$ ]] && [ "$port" -le 65535 ] || die "--port must be 1..65535, not $port"
  installed || die "nginx with Nchan is not installed; run scripts/nchan.sh ensure"
  if pid=$(running_pid); then
    die "already running (pid $pid, $RUN); scripts/nchan.sh stop first"
  fi
  if answers "$port"; then
    die "something already answers on 127.0.0.1:$port"
  fi

  # File descriptors: the hard limit per process (20,000 here, it cannot
  # be raised), less headroom for logs, the listener and Nchan's pipes.
  local nofile
  nofile=$(ulimit -Hn)
  [ "$nofile" = unlimited ] && nofile=1048576
  [ "$nofile" -gt 1048576 ] && nofile=1048576
  [ "$nofile" -ge 1024 ] || die "the hard open-file limit ($nofile) is too low"
  local conns=$((nofile - 500))

  mkdir -p "$RUN/tmp"
  rm -f "$RUN/error.log"
  sed -e "s|@NCHAN_MODULE@|$MODULE|" \
      -e "s|@USER@|$(id -un)|" -e "s|@GROUP@|$(id -gn)|" \
      -e "s|@WORKERS@|$workers|" -e "s|@PORT@|$port|" \
      -e "s|@NOFILE@|$nofile|" -e "s|@CONNECTIONS@|$conns|" \
      -e "s|@SHM@|${NCHAN_SHM:-256M}|" \
      "$TEMPLATE" >"$RUN/nginx.conf"
  if grep -q '@[A-Z_]*@' "$RUN/nginx.conf"; then
    die "unfilled placeholder in $RUN/nginx.conf: $(grep -o '@[A-Z_]*@' "$RUN/nginx.conf" | head -n 1)"
  fi
  # -e: the startup error log before the config is read (not /var/log/nginx).
  "$NGINX" -t -q -p "$RUN/" -e "$RUN/error.log" -c "$RUN/nginx.conf" \
    || die "config test failed for $RUN/nginx.conf"
  # nginx sets each worker's soft limit from worker_rlimit_nofile itself;
  # raise the master's too so it can hold as many.
  ulimit -Sn "$nofile"
  "$NGINX" -p "$RUN/" -e "$RUN/error.log" -c "$RUN/nginx.conf" \
    || die "nginx failed to start; see $RUN/error.log"
  for _ in $(seq 1 100); do
    if answers "$port" && pid=$(running_pid); then
      echo "nchan: nginx $pid on 127.0.0.1:$port, $workers workers, $conns connections/worker ($RUN)"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$RUN/error.log" >&2 || true
  stop >/dev/null 2>&1 || true
  die "nginx did not answer on 127.0.0.1:$port within 10 s"
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    echo "nchan: not running"
    rm -f "$PIDFILE"
    return 0
  fi
  kill -QUIT "$pid" # graceful: workers close their connections
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "nchan: nginx $pid did not exit in 10 s, terminating" >&2
    kill -TERM "$pid" 2>/dev/null || true
    sleep 1
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  echo "nchan: stopped nginx $pid"
}

status() {
  local pid port
  if pid=$(running_pid); then
    port=$(sed -n 's/^ *listen 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$RUN/nginx.conf" | head -n 1)
    echo "nchan: running, master $pid, workers $(pgrep -P "$pid" | tr '\n' ' ')on 127.0.0.1:$port ($RUN)"
    (exec 3<>"/dev/tcp/127.0.0.1/$port" && printf 'GET /nchan_status HTTP/1.0\r\nHost: nchan\r\n\r\n' >&3 \
      && sed '1,/^\r$/d' <&3) 2>/dev/null || true
  else
    echo "nchan: not running"
    return 3
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  ensure) ensure ;;
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 {ensure|start [--workers N] [--port P]|stop|status}" >&2; exit 2 ;;
esac
