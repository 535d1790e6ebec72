#!/usr/bin/env bash
# functions.sh install|dir — the Lambda runtime clients that run the
# `function` handler kind's test fixtures and examples (issue 16), outside
# the repository in ${SHARDLINE_FUNCTIONS_DIR:-$HOME/.cache/shardline/functions}:
#
#   venv/        Python venv: awslambdaric + aws-lambda-powertools (pinned)
#   node/        node_modules/aws-lambda-ric (pinned; builds native code:
#                its bundled curl and aws-lambda-cpp, then a node-gyp addon)
#   rust/        fixture-function, built from tests/functions/rust when that
#                crate exists (target dir rust/target)
#
# `install` is idempotent: each part carries a stamp of what it was built
# from (pins, interpreter version), and a part whose stamp matches is left
# alone, so a second run takes about a second. `dir` prints the directory.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${SHARDLINE_FUNCTIONS_DIR:-$HOME/.cache/shardline/functions}")
export PATH="$HOME/.cargo/bin:$PATH"

# Every package the install pulls is pinned, transitive ones included, so a
# new release upstream cannot change what the tests run.
python_pins=(
  awslambdaric==4.2.2
  aws-lambda-powertools==3.37.0
  simplejson==4.3.0
  snapshot-restore-py==1.0.0
  jmespath==1.1.0
  typing_extensions==4.16.0
)
# 3.3.0 is the newest release for Node.js 20; 4.x requires Node.js >= 22.
node_ric_version=3.3.0

log() { printf 'functions: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  echo "usage: $0 install|dir" >&2
  exit 2
}

# aws-lambda-ric's preinstall runs curl's autoreconf/configure/make and
# aws-lambda-cpp's cmake build; its postinstall runs node-gyp, which needs
# python3, make and g++.
ensure_build_tools() {
  local missing=() pair tool pkg
  for pair in cmake:cmake autoreconf:autoconf automake:automake libtoolize:libtool \
    make:make g++:g++ python3:python3; do
    tool=${pair%%:*} pkg=${pair#*:}
    command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if [[ $(id -u) != 0 ]]; then
    die "missing build tools for aws-lambda-ric: install the Debian packages ${missing[*]}"
  fi
  log "installing ${missing[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_python() {
  command -v python3 >/dev/null || die "python3 not found (needed for the venv)"
  local stamp="$dir/venv/.shardline-stamp" want
  want="$(python3 -c 'import sys; print(sys.version.split()[0])') ${python_pins[*]}"
  if [[ -f $stamp && $(<"$stamp") == "$want" && -x $dir/venv/bin/python ]]; then
    return 0
  fi
  log "python: creating venv with ${python_pins[*]}"
  rm -rf "$dir/venv"
  python3 -m venv "$dir/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --no-input "${python_pins[@]}"
  "$dir/venv/bin/python" -c 'import awslambdaric, aws_lambda_powertools' ||
    die "the venv at $dir/venv cannot import awslambdaric and aws_lambda_powertools"
  printf '%s\n' "$want" >"$stamp"
}

install_node() {
  command -v node >/dev/null || die "node not found (needed for aws-lambda-ric)"
  command -v npm >/dev/null || die "npm not found (needed for aws-lambda-ric)"
  local node_dir="$dir/node" stamp want
  stamp="$node_dir/.shardline-stamp"
  # The addon is built against this Node.js's ABI: a new Node.js rebuilds it.
  want="$(node --version) aws-lambda-ric@$node_ric_version"
  if [[ -f $stamp && $(<"$stamp") == "$want" &&
    -f $node_dir/node_modules/aws-lambda-ric/dist/rapid-client.node ]]; then
    return 0
  fi
  ensure_build_tools
  # node-gyp would download Node.js's headers from the internet; use the
  # ones installed with Node.js itself instead.
  if [[ -z ${npm_config_nodedir:-} ]]; then
    local prefix
    prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
    [[ -f $prefix/include/node/node_api.h ]] ||
      die "Node.js headers not found at $prefix/include/node (node-gyp needs them; set npm_config_nodedir to their prefix)"
    export npm_config_nodedir=$prefix
  fi
  log "node: installing aws-lambda-ric@$node_ric_version (builds curl and aws-lambda-cpp: a few minutes)"
  rm -rf "$node_dir"
  mkdir -p "$node_dir"
  # allowScripts: npm 12 runs a dependency's install scripts only when the
  # project approves them, and the native build is those scripts.
  cat >"$node_dir/package.json" <<EOF
{
  "name": "shardline-functions",
  "private": true,
  "description": "Runtime clients for shardline's function handlers; written by scripts/functions.sh",
  "dependencies": { "aws-lambda-ric": "$node_ric_version" },
  "allowScripts": { "aws-lambda-ric@$node_ric_version": true }
}
EOF
  if ! (cd "$node_dir" && npm install --no-audit --no-fund --foreground-scripts) >"$node_dir/install.log" 2>&1; then
    tail -n 40 "$node_dir/install.log" >&2
    die "npm install aws-lambda-ric@$node_ric_version failed; full log: $node_dir/install.log"
  fi
  [[ -f $node_dir/node_modules/aws-lambda-ric/dist/rapid-client.node ]] ||
    die "aws-lambda-ric installed without its native addon (were its install scripts skipped?); log: $node_dir/install.log"
  printf '%s\n' "$want" >"$stamp"
}

# Cargo is its own freshness check (a no-op build takes a fraction of a
# second), so this part runs every time; the binary is replaced only when
# it changed, keeping its mtime for whoever compares against it.
install_rust() {
  local manifest="$root/tests/functions/rust/Cargo.toml"
  if [[ ! -f $manifest ]]; then
    log "rust: no tests/functions/rust/Cargo.toml, skipping the Rust fixture"
    return 0
  fi
  command -v cargo >/dev/null || die "cargo not found (needed for tests/functions/rust)"
  mkdir -p "$dir/rust"
  [[ -x $dir/rust/fixture-function ]] ||
    log "rust: building tests/functions/rust (its dependencies too: a few minutes the first time)"
  local messages built
  messages=$(CARGO_TARGET_DIR="$dir/rust/target" cargo build --release --quiet \
    --manifest-path "$manifest" --message-format=json-render-diagnostics) ||
    die "cargo build of tests/functions/rust failed"
  # The crate's one binary, whatever it is named.
  built=$(python3 -c '
import json, sys
exes = {m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")}
if len(exes) != 1:
    sys.exit("tests/functions/rust must build exactly one binary, built: %s" % sorted(exes))
print(exes.pop())' <<<"$messages") || die "no binary to install from tests/functions/rust"
  if ! cmp -s "$built" "$dir/rust/fixture-function"; then
    cp "$built" "$dir/rust/fixture-function.tmp"
    mv -f "$dir/rust/fixture-function.tmp" "$dir/rust/fixture-function"
  fi
}

case ${1:-} in
  dir)
    ((${#} == 1)) || usage
    printf '%s\n' "$dir"
    ;;
  install)
    ((${#} == 1)) || usage
    mkdir -p "$dir"
    # Concurrent installs (parallel test runs) wait for each other instead
    # of building into the same directories.
    exec 9>"$dir/.lock"
    flock 9
    install_python
    install_node
    install_rust
    ;;
  *) usage ;;
esac
