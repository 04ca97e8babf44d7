#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ answer on 127.0.0.1 at their
# default ports: starts them when installed, installs them with apt (Debian)
# when not. Idempotent: does nothing when all three already answer.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  for _ in $(seq 1 "$3"); do port_open "$1" && return 0; sleep 1; done
  echo "services: $2 did not come up on 127.0.0.1:$1 within $3 s" >&2
  return 1
}

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
APT_UPDATED=""
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "services: $* missing and this is not a Debian-like machine; install it and re-run" >&2
    exit 1
  fi
  [ -n "$APT_UPDATED" ] || { $SUDO apt-get update -qq; APT_UPDATED=1; }
  echo "services: installing $* with apt"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL, trust auth on 127.0.0.1 (a development default: the backend
# connects as user postgres without a password).
if ! port_open 5432; then
  installed_pg=""
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    apt_install postgresql
    installed_pg=1
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ -n "$installed_pg" ]; then
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  echo "services: starting PostgreSQL $ver"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_port 5432 PostgreSQL 60
fi

# Redis, nothing on disk.
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  echo "services: starting Redis"
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 Redis 30
fi

# RabbitMQ (guest/guest is allowed from localhost by default).
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  echo "services: starting RabbitMQ"
  $SUDO rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ 120
fi

echo "services: PostgreSQL :5432, Redis :6379, RabbitMQ :5672 are up"
