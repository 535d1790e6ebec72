#!/usr/bin/env bash
# One command for the fan-out example, on a machine with RabbitMQ on
# 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432 (database `test`, user
# postgres; `scripts/brokers.sh up` starts them): builds, starts a coordinator
# and a worker, publishes notifications, shows both subscribers' progress
# until the notifier is done, and stops what it started.
# Usage: examples/fanout/run.sh [COUNT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
count="${1:-200}"
db="postgres://postgres@127.0.0.1:5432/test"

cargo build -q -p shardline-coordinator -p shardline-example-fanout
target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="$target/debug"
work="$(mktemp -d)"
pids=()
# The example's queues (the subscriptions', their retry and dead-letter
# queues): removed at the end, so each run starts empty.
queues() { rabbitmqctl -q list_queues name 2>/dev/null | grep -E '^(audit|notify)(\.|$)' || true; }
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for q in $(queues); do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

cd "$work"
for q in $(queues); do rabbitmqctl -q delete_queue "$q" >/dev/null; done
psql -qX "$db" -c "DROP SCHEMA IF EXISTS fanout CASCADE"
"$bin/shardline-coordinator" --config "$here/coordinator.toml" 2>coordinator.log &
pids+=($!)
sleep 2
"$bin/fanout" --config "$here/worker.toml" --worker-id fanout-1 2>worker.log &
pids+=($!)
sleep 3
"$bin/notifications" --count "$count"

# The queues' depths as RabbitMQ reports them (ready messages).
depth() { rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$1" '$1 == q {print $2}'; }
for _ in $(seq 1 600); do
    audited="$(psql -qtAX "$db" -c "SELECT count(*) FROM fanout.audit_log")"
    notified="$(psql -qtAX "$db" -c "SELECT count(*) FROM fanout.notified")"
    dead="$(depth notify.dlq || true)"
    echo "audited $audited/$count  notified $notified  dead-lettered ${dead:-?}  notify queue $(depth notify || true)"
    [ "$notified" -gt 0 ] && [ $((notified + ${dead:-0})) -ge "$count" ] && break
    sleep 1
done
