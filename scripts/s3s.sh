#!/usr/bin/env bash
# s3s.sh install|bin — the S3-compatible endpoint the uploads example's
# end-to-end test (tests/tests/example_uploads.rs) runs against: the
# `s3s-fs` server from crates.io (a directory served over the S3 API),
# installed with `cargo install --locked` (its own pinned lock file) into
# ${SHARDLINE_S3S_DIR:-$HOME/.cache/shardline/s3s}, outside the workspace so
# its dependencies add nothing to the workspace's build.
#
# `install` is idempotent: a stamp records the version built, and a binary
# whose stamp matches is left alone (a second run takes well under a second).
# `bin` prints the binary's path (the test reads $SHARDLINE_S3S_BIN, else this).
set -euo pipefail

dir=$(realpath -m "${SHARDLINE_S3S_DIR:-$HOME/.cache/shardline/s3s}")
export PATH="$HOME/.cargo/bin:$PATH"
# 0.14.1 is the newest release whose rust-version (1.92) this toolchain
# meets; 0.15 and later need 1.96.
version=0.14.1
stamp="s3s-fs $version features=binary"

log() { printf 's3s: %s\n' "$*" >&2; }

case "${1:-}" in
  install)
    if [[ -x $dir/bin/s3s-fs && -f $dir/stamp && $(cat "$dir/stamp") == "$stamp" ]]; then
      exit 0
    fi
    log "installing s3s-fs $version into $dir (cargo install --locked; a few minutes once)"
    mkdir -p "$dir"
    rm -f "$dir/stamp"
    cargo install --locked --quiet --root "$dir" --version "$version" --features binary --force s3s-fs
    echo "$stamp" >"$dir/stamp"
    ;;
  bin)
    echo "$dir/bin/s3s-fs"
    ;;
  *)
    echo "usage: $0 install|bin" >&2
    exit 2
    ;;
esac
