#!/usr/bin/env bash
# wrk.sh install — the HTTP load generator `loadtest bench gateway` drives
# the gateway with: Debian's `wrk` package. Idempotent (nothing to do when
# `wrk` is on PATH).
set -euo pipefail
case "${1:-}" in
  install)
    command -v wrk >/dev/null && exit 0
    [[ $(id -u) == 0 ]] || { echo "wrk.sh: wrk is missing: apt-get install wrk" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    command -v wrk >/dev/null
    ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
