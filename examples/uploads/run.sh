#!/usr/bin/env bash
# examples/uploads/run.sh [IMAGE...] — the uploads example in one command:
# RabbitMQ (scripts/brokers.sh up when it does not answer), the coordinator and one `uploads`
# worker started from this directory's configs (buckets are directories
# under run/uploads-data), the given images (or 6 generated ones and a
# poison file) put into the `incoming` bucket and their ObjectCreated
# notifications published to the `uploads` topic; then it waits for the
# thumbnails and metadata, prints them and the dead letters' count, and
# stops both processes. Ports: 7400, 9400, 9500 (the configs').
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"

# Only RabbitMQ is needed; the project's script installs and starts the
# brokers when it does not answer.
status=$("$root/scripts/brokers.sh" status)
grep -q '^rabbitmq: up' <<<"$status" || "$root/scripts/brokers.sh" up >/dev/null
# The whole workspace's binaries, as scripts/test.sh builds them: one
# feature set, so this reuses (and leaves) the same build.
(cd "$root" && cargo build -q --workspace --bins)
bin=${CARGO_TARGET_DIR:-$root/target}/debug

run=$here/run
rm -rf "$run"
mkdir -p "$run/uploads-data/incoming" "$run/uploads-data/derived"
cd "$run"

pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
"$bin/shardline-coordinator" --config "$here/coordinator.toml" >coordinator.log 2>&1 &
pids+=($!)
"$bin/uploads" --config "$here/worker.toml" >worker.log 2>&1 &
pids+=($!)

# Ready once registered and holding a queue slot.
for _ in $(seq 1 120); do
  curl -fs http://127.0.0.1:9500/readyz >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs http://127.0.0.1:9500/readyz >/dev/null || { echo "the worker never became ready; see $run/worker.log" >&2; exit 1; }

# Publishing is refused (unroutable) until the coordinator has declared the
# topic and the subscription's queue: try for up to 30 s.
notify() {
  for _ in $(seq 1 30); do
    "$bin/uploads-notify" --root uploads-data --bucket incoming --topic uploads "$@" && return 0
    sleep 1
  done
  return 1
}

if (($#)); then
  keys=()
  for f in "$@"; do
    cp "$f" "uploads-data/incoming/$(basename "$f")"
    keys+=("$(basename "$f")")
  done
  notify "${keys[@]}"
  want=$#
else
  # 6 images and one text file named .png (the poison).
  notify --samples 6
  want=6
fi

for _ in $(seq 1 120); do
  got=$({ find uploads-data/derived/metadata -name '*.json' 2>/dev/null || true; } | wc -l)
  ((got >= want)) && break
  sleep 0.5
done
echo "thumbnails:"
find uploads-data/derived/thumbnails -type f | sort | sed 's/^/  /'
echo "metadata, e.g.:"
first=$(find uploads-data/derived/metadata -name '*.json' | sort | head -1)
cat "$first"
echo
# A poison upload is retried twice (2 s, 4 s), then dead-lettered.
if ((!$#)); then
  for _ in $(seq 1 60); do
    dead=$({ curl -fs http://127.0.0.1:9500/metrics || true; } | awk '/^shardline_dead_lettered_total/ {s += $2} END {print s + 0}')
    ((dead >= 1)) && break
    sleep 0.5
  done
  # The queues are durable: notifications left by an earlier run whose
  # files are gone (run/ is made anew) fail too and add to this count.
  echo "dead-lettered by this worker: $dead (queue thumbnails.dlq; each one's shardline.error header says why)"
fi
echo "everything is under $run"
