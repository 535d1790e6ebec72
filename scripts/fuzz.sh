#!/usr/bin/env bash
# fuzz.sh build | fuzz.sh run RUNS [TARGET...] — the cargo-fuzz targets in fuzz/.
#
#   build       installs cargo-fuzz when missing and builds every target.
#   run RUNS    builds, then runs each target (or those named) for RUNS
#               inputs (libFuzzer's -runs), one after the other; stops at
#               the first target that fails (a panic: its input is saved
#               under fuzz/artifacts/TARGET/). The corpus grows in
#               fuzz/corpus/TARGET (ignored by git), seeded from
#               fuzz/seeds/TARGET when there is one (and with the
#               dictionary fuzz/dicts/TARGET.dict if any).
#
# Works on the stable toolchain: `-s none` builds without a sanitizer (the
# targets are safe Rust; what they hunt is panics, overflow included:
# debug assertions are on), which needs no nightly-only flag.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_FUZZ:-$HOME/.cache/shardline/target-fuzz}"
cd "$root/fuzz"

build() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
  fi
  cargo fuzz build -s none --target-dir "$CARGO_TARGET_DIR"
}

case "${1:-}" in
  build)
    build
    ;;
  run)
    runs=${2:?usage: fuzz.sh run RUNS [TARGET...]}
    shift 2
    build
    targets=("$@")
    if [ ${#targets[@]} -eq 0 ]; then
      mapfile -t targets < <(cargo fuzz list)
    fi
    for t in "${targets[@]}"; do
      mkdir -p "corpus/$t"
      seeds=() flags=()
      if [ -d "seeds/$t" ]; then seeds=("seeds/$t"); fi
      if [ -f "dicts/$t.dict" ]; then flags=("-dict=dicts/$t.dict"); fi
      echo "fuzz: $t for $runs inputs" >&2
      start=$(date +%s)
      cargo fuzz run -s none --target-dir "$CARGO_TARGET_DIR" "$t" "corpus/$t" "${seeds[@]}" -- \
        -runs="$runs" -print_final_stats=1 "${flags[@]}"
      echo "fuzz: $t: $runs inputs, no panic, $(($(date +%s) - start)) s" >&2
    done
    ;;
  *)
    sed -n '2,/^set -euo/p' "$root/scripts/fuzz.sh" | grep '^#' >&2
    exit 2
    ;;
esac
