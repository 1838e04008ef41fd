#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and Mosquitto answer on 127.0.0.1: install what is
# missing (Debian, apt-get), start what is installed but stopped. Chromium comes
# along for the admin's browser tests, Prometheus (and its promtool) for the metrics tests;
# neither is started here: the tests start their own.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
  echo "ensure-services: $2 did not start on 127.0.0.1:$1; see its log" >&2
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
installed_pg=no
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "ensure-services: missing ${missing[*]} and no apt-get; install them and run again" >&2
    exit 1
  fi
  echo "ensure-services: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  [[ " ${missing[*]} " == *" postgresql "* ]] && installed_pg=yes
fi

if ! port_open 5432; then
  echo "ensure-services: starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  wait_port 5432 PostgreSQL
fi
if [ "$installed_pg" = yes ]; then
  # A fresh Debian cluster asks for a password over TCP; give the tests one.
  as_root runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'postgres'"
fi

if ! port_open 6379; then
  echo "ensure-services: starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/edgefleet.log
  wait_port 6379 Redis
fi

if ! port_open 1883; then
  echo "ensure-services: starting Mosquitto"
  as_root mkdir -p /run/mosquitto /var/lib/mosquitto /var/log/mosquitto
  as_root chown mosquitto: /run/mosquitto /var/lib/mosquitto /var/log/mosquitto 2>/dev/null || true
  as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
  wait_port 1883 Mosquitto
fi
echo "ensure-services: PostgreSQL, Redis and Mosquitto answer on 127.0.0.1"
