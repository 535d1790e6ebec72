#!/usr/bin/env bash
# brokers.sh up|down|status — the brokers shardline runs against, on 127.0.0.1.
#
#   RabbitMQ on 5672 (guest/guest): installed with apt-get when missing,
#     started when down, ready once it answers the AMQP handshake.
#   A Kafka-protocol broker on 9092: tansu 0.6.0 (installed with cargo when
#     missing), SQLite storage engine under .brokers/, ready once it answers
#     a Metadata request.
#   PostgreSQL on 5432 (the replicated lease store's tests): installed with
#     apt-get when missing, its cluster started when down, ready once
#     `psql -U postgres` answers on 127.0.0.1; the `test` database and trust
#     authentication for local TCP are set up when missing.
#
# Idempotent: `up` on running brokers changes nothing. Point shardline at
# your own clusters instead with SHARDLINE_KAFKA_BROKERS / SHARDLINE_AMQP_URL.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.brokers"
kafka_port=${SHARDLINE_TEST_KAFKA_PORT:-9092}
amqp_port=5672
tansu_version=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf 'brokers: %s\n' "$*" >&2; }

# Sends a Kafka Metadata v0 request (all topics) and checks for a reply with
# our correlation id: proof the broker speaks Kafka, not just that a port is open.
kafka_ready() {
  python3 - "$kafka_port" <<'PY' 2>/dev/null
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
client = b"shardline-probe"
body = struct.pack(">hhih", 3, 0, 4242, len(client)) + client + struct.pack(">i", -1)
s.sendall(struct.pack(">i", len(body)) + body)
head = s.recv(8)
sys.exit(0 if len(head) == 8 and struct.unpack(">ii", head)[1] == 4242 else 1)
PY
}

# Opens an AMQP 0-9-1 connection far enough to get Connection.Start.
amqp_ready() {
  python3 - "$amqp_port" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.sendall(b"AMQP\x00\x00\x09\x01")
frame = s.recv(7)
sys.exit(0 if len(frame) == 7 and frame[0] == 1 else 1)
PY
}

wait_for() { # name probe seconds
  local name=$1 probe=$2 seconds=$3
  for _ in $(seq 1 $((seconds * 2))); do
    if $probe; then log "$name ready"; return 0; fi
    sleep 0.5
  done
  log "$name did not become ready within ${seconds}s"
  return 1
}

need_python() {
  command -v python3 >/dev/null && return 0
  log "installing python3 (used to probe the brokers)"
  apt-get update -qq && apt-get install -y -qq python3 >/dev/null
}

rabbit_up() {
  if amqp_ready; then log "rabbitmq already up"; return 0; fi
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing rabbitmq-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  if rabbitmqctl -q status >/dev/null 2>&1; then
    log "rabbitmq node up but its app is stopped: starting the app"
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
  else
    log "starting rabbitmq"
    rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
  wait_for rabbitmq amqp_ready 120
}

pg_ready() {
  psql -h 127.0.0.1 -U postgres -d "${1:-postgres}" -Atqc 'select 1' >/dev/null 2>&1
}

postgres_up() {
  if pg_ready test; then log "postgresql already up"; return 0; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    log "installing postgresql"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  if ! pg_ready; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    # Tests connect over TCP as postgres without a password, as on the
    # machines CI runs on.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
      log "allowing trust authentication on 127.0.0.1 ($hba)"
      sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    log "starting postgresql $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || pg_ctlcluster "$version" main start
    wait_for postgresql pg_ready 60
  fi
  if ! pg_ready test; then
    log "creating database test"
    psql -h 127.0.0.1 -U postgres -qc 'CREATE DATABASE test' >/dev/null
  fi
  log "postgresql ready"
}

tansu_installed() {
  command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$tansu_version"
}

kafka_up() {
  if kafka_ready; then
    log "kafka (tansu) already up on $kafka_port"
    [[ -f "$state/tansu.db" ]] && index_headers
    return 0
  fi
  if ! tansu_installed; then
    log "installing tansu $tansu_version (about 10 minutes on 2 cores, once)"
    cargo install --locked tansu --version "$tansu_version" --features dynostore,libsql
  fi
  mkdir -p "$state"
  log "starting tansu on 127.0.0.1:$kafka_port"
  # tansu 0.6.0 mangles absolute sqlite paths: run it in the state dir and
  # give it a relative file. Its own session (setsid): a broker started
  # from a shell that ends, or a process group that is killed, stays up.
  (
    cd "$state"
    setsid nohup tansu broker \
      --listener-url "tcp://127.0.0.1:$kafka_port" \
      --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
      --storage-engine "sqlite://tansu.db" >"$state/tansu.log" 2>&1 &
    echo $! >"$state/tansu.pid"
  )
  if ! wait_for kafka kafka_ready 60; then
    tail -20 "$state/tansu.log" >&2 || true
    return 1
  fi
  index_headers
}

# tansu 0.6.0 looks up each fetched record's headers with a query on an
# unindexed table: every fetch scans all headers ever written, and a busy
# topic stalls the whole broker within minutes. An index on the lookup key
# makes it a point query. Safe to repeat; the table is tansu's own schema.
index_headers() {
  python3 - "$state/tansu.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("create index if not exists shardline_header_record on header (topition, offset_id)")
db.commit()
PY
  log "kafka (tansu) header index in place"
}

kafka_down() {
  if [[ -f "$state/tansu.pid" ]]; then
    kill "$(cat "$state/tansu.pid")" 2>/dev/null || true
    rm -f "$state/tansu.pid"
  fi
  pkill -f "tansu broker --listener-url tcp://127.0.0.1:$kafka_port" 2>/dev/null || true
  # Wait for the port to be free, so an `up` right after does not collide.
  for _ in $(seq 1 50); do
    pgrep -f "tansu broker --listener-url tcp://127.0.0.1:$kafka_port" >/dev/null || break
    sleep 0.2
  done
  log "kafka (tansu) stopped"
}

case "${1:-}" in
  up)
    need_python
    rabbit_up
    postgres_up
    kafka_up
    ;;
  down)
    kafka_down
    # RabbitMQ is usually a machine-wide service shared with other users: leave it.
    log "rabbitmq left running (stop it with: rabbitmqctl stop)"
    ;;
  status)
    need_python
    amqp_ready && echo "rabbitmq: up (127.0.0.1:$amqp_port)" || echo "rabbitmq: down"
    kafka_ready && echo "kafka: up (127.0.0.1:$kafka_port)" || echo "kafka: down"
    pg_ready test && echo "postgresql: up (127.0.0.1:5432)" || echo "postgresql: down"
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
