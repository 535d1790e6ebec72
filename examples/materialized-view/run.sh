#!/usr/bin/env bash
# One command for the materialized-view example, on a machine with tansu (or
# Kafka) on 127.0.0.1:9092 and PostgreSQL on 127.0.0.1:5432 (database `test`,
# user postgres; `scripts/brokers.sh up` starts all three): builds, starts a
# coordinator and two workers, produces 3,000 changes, waits until the view
# has applied them all, prints the view, and stops what it started.
# Usage: examples/materialized-view/run.sh [CHANGES]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
changes="${1:-3000}"
db="postgres://postgres@127.0.0.1:5432/test"
# A topic of its own per run (the generator starts from an empty table), and
# the view started afresh.
topic="order-changes-$(date +%s)"

cargo build -q -p shardline-coordinator -p shardline-example-materialized-view
target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="$target/debug"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cd "$work"
psql -qX "$db" -c "DROP SCHEMA IF EXISTS orders_view CASCADE"
"$bin/order-changes" --topic "$topic" --changes "$changes"
sed "s/^name = \"order-changes\"/name = \"$topic\"/" "$here/coordinator.toml" >coordinator.toml
"$bin/shardline-coordinator" --config coordinator.toml 2>coordinator.log &
pids+=($!)
sleep 2
"$bin/materialized-view" --config "$here/worker.toml" --worker-id view-1 2>worker-1.log &
pids+=($!)
sed 's/127.0.0.1:9500/127.0.0.1:9501/' "$here/worker.toml" >worker-2.toml
"$bin/materialized-view" --config worker-2.toml --worker-id view-2 2>worker-2.log &
pids+=($!)

echo "waiting for the view to apply every change (logs in $work)..."
for _ in $(seq 1 120); do
    behind="$(psql -qtAX "$db" -c "SELECT coalesce(sum(next_offset), 0) FROM orders_view.applied WHERE stream = '$topic'" 2>/dev/null || echo 0)"
    end="$("$bin/order-changes" --topic "$topic" --changes 0 --end)"
    [ "$behind" = "$end" ] && break
    sleep 1
done
psql "$db" -c "SELECT * FROM orders_view.customer_totals ORDER BY customer" \
    -c "SELECT * FROM orders_view.status_counts ORDER BY status" \
    -c "SELECT stream, partition, epoch, next_offset, applied, skipped, refused FROM orders_view.applied ORDER BY partition"
