#!/usr/bin/env bash
# What the build itself needs beyond the Rust toolchain: librdkafka is
# built with TLS and SASL (rdkafka's `ssl` feature) against Debian's
# OpenSSL, found through pkg-config. Idempotent and quiet when present.
set -euo pipefail
missing=()
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ((${#missing[@]})); then
  echo "build-deps: installing ${missing[*]} (apt)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
