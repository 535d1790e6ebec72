#!/usr/bin/env bash
# The main job on a fresh machine: brokers up, release build, then a short
# load run through the real coordinator and worker binaries:
#   1. the coordinator benchmark (durable checkpoints/s, a 200-worker fleet),
#   2. a Kafka run: records produced to an 8-partition topic, read once by a
#      raw rdkafka consumer and once through shardline (coordinator + worker
#      + leases + checkpoints), with both rates and the worker's memory,
#   3. a RabbitMQ run: messages published with confirms to a subscription,
#      consumed once by a raw lapin consumer and once through a queue slot.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/brokers.sh up
scripts/build-deps.sh
cargo build --release --workspace --bins
bin=target/release
echo
echo "== coordinator: checkpoints and a simulated fleet"
"$bin/shardline-loadtest" bench coordinator --mode both --duration 5
echo
echo "== kafka: raw consumer vs shardline worker (noop handler)"
"$bin/shardline-loadtest" bench kafka --records "${RECORDS:-100000}"
echo
echo "== rabbitmq: raw lapin consumer vs shardline queue slot (noop handler)"
"$bin/shardline-loadtest" bench amqp --messages "${MESSAGES:-50000}"
