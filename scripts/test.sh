#!/usr/bin/env bash
# The test command: brokers up, the binaries built (the end-to-end tests run
# them as child processes; a bare `cargo test` on binaries older than their
# sources fails saying so, see tests/src/fresh.rs), then every test in the
# workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/brokers.sh up
scripts/build-deps.sh
# The runtime clients (awslambdaric, aws-lambda-ric, lambda_runtime) the
# function tests run Lambda functions through.
scripts/functions.sh install
# The S3-compatible endpoint (s3s-fs, cargo install --locked into a cache
# dir) the uploads example's test runs against.
scripts/s3s.sh install
# schemathesis (PyPI, pinned, in a venv) for the gateway's OpenAPI test.
scripts/schemathesis.sh install
# Docker (Debian's docker.io, a daemon with no bridge) and the image's base
# built from Debian's packages, for tests/tests/image.rs; the compose file
# checked.
scripts/image.sh setup
scripts/image.sh compose-check
cargo build --workspace --bins
# deploy/: manifests, units, dashboard and alerts (installs its tools once).
scripts/deploy-check.sh
cargo test --workspace "$@"
