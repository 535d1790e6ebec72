#!/usr/bin/env bash
# schemathesis.sh install|bin — schemathesis (PyPI), which tests/tests/gateway.rs
# runs against the gateway's own /openapi.json, in a venv outside the
# repository: ${SHARDLINE_SCHEMATHESIS_DIR:-$HOME/.cache/shardline/schemathesis}.
#
# `install` is idempotent: the venv carries a stamp of the pin and the
# interpreter's version, and is left alone when it matches (about a second).
# `bin` prints the path of the `schemathesis` command the test runs.
set -euo pipefail

dir=$(realpath -m "${SHARDLINE_SCHEMATHESIS_DIR:-$HOME/.cache/shardline/schemathesis}")
pin=schemathesis==4.32.5

log() { printf 'schemathesis: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

install() {
  command -v python3 >/dev/null || die "python3 not found (needed for the venv)"
  local stamp="$dir/venv/.shardline-stamp" want
  want="$pin $(python3 --version 2>&1)"
  if [[ -f $stamp && $(<"$stamp") == "$want" && -x $dir/venv/bin/schemathesis ]]; then
    return 0
  fi
  log "creating a venv with $pin in $dir/venv"
  rm -rf "$dir/venv"
  mkdir -p "$dir"
  python3 -m venv "$dir/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --no-input "$pin"
  "$dir/venv/bin/schemathesis" --version >/dev/null || die "the venv's schemathesis does not run"
  printf '%s\n' "$want" >"$stamp"
}

case "${1:-}" in
  install) install ;;
  bin) echo "$dir/venv/bin/schemathesis" ;;
  *) echo "usage: $0 install|bin" >&2; exit 2 ;;
esac
