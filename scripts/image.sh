#!/usr/bin/env bash
# The container image (top-level Dockerfile) and the compose file
# (deploy/compose) on a machine that cannot pull from a registry: Debian's
# packages only. Idempotent; every step is skipped when already done.
#
#   scripts/image.sh setup          docker.io, debootstrap and docker-compose (apt);
#                                   dockerd running (bridge none: containers use
#                                   the host's network); the runtime base
#                                   image built from Debian's packages, once
#                                   per machine
#   scripts/image.sh build [DIR]    the image `shardline:e2e` (or $SHARDLINE_IMAGE)
#                                   from the binaries in DIR (default: the
#                                   debug build in $CARGO_TARGET_DIR or target/),
#                                   built on this Debian 12 host: no compile
#                                   inside Docker
#   scripts/image.sh build-full     the image from the Dockerfile's own builder
#                                   stage (a release build of the workspace
#                                   inside Docker, ~15+ min on 2 cores; not CI),
#                                   with a Rust builder image made here from the
#                                   base and this host's toolchain
#   scripts/image.sh compose-check  deploy/compose/docker-compose.yml is valid
#                                   (docker-compose config) and every file it
#                                   mounts exists
#
# tests/tests/image.rs runs `build` and then the image against the brokers
# on 127.0.0.1; scripts/test.sh runs `setup` and `compose-check` first.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="${SHARDLINE_CACHE:-$HOME/.cache/shardline}"
LOG="$STATE/dockerd.log"
BASE=shardline-base:bookworm-1
RUST_BASE=shardline-rust:bookworm
BINS=shardline-bins:host
IMAGE="${SHARDLINE_IMAGE:-shardline:e2e}"
BIN_NAMES=(shardline-coordinator shardline-worker shardline)

say() { echo "image: $*" >&2; }

# Temporary directories, removed however the script ends.
CLEANUP=()
trap 'rm -rf "${CLEANUP[@]}"' EXIT

# Debian's client (docker.io) drives BuildKit itself; a newer client
# without its buildx plugin cannot, and the classic builder would build
# the Dockerfile's unused builder stage too.
docker_cli() {
  if [[ -x /usr/bin/docker ]]; then echo /usr/bin/docker; else command -v docker; fi
}

install_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  # strip/objcopy for the host binaries.
  command -v objcopy >/dev/null 2>&1 || missing+=(binutils)
  if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# A running daemon is used as it is; otherwise one is started with no
# bridge network (every container runs with --network host, so nothing
# leaves 127.0.0.1) and without iptables, which this machine may lack.
start_dockerd() {
  local docker
  docker="$(docker_cli)"
  if "$docker" info >/dev/null 2>&1; then return; fi
  mkdir -p "$STATE"
  if ! pgrep -x dockerd >/dev/null; then
    say "starting dockerd (log: $LOG)"
    setsid nohup dockerd --bridge=none --iptables=false >>"$LOG" 2>&1 </dev/null &
  fi
  for _ in $(seq 1 60); do
    if "$docker" info >/dev/null 2>&1; then return; fi
    sleep 0.5
  done
  say "dockerd did not answer within 30 s; its log ($LOG) ends:"
  tail -n 20 "$LOG" >&2 || true
  exit 1
}

# debian:bookworm-slim's equivalent from Debian's packages: debootstrap's
# minbase, without documentation, man pages, locales and apt's lists.
build_base() {
  local docker rootfs
  docker="$(docker_cli)"
  if "$docker" image inspect "$BASE" >/dev/null 2>&1; then return; fi
  say "building $BASE with debootstrap (once per machine, about a minute)"
  rootfs="$(mktemp -d)"
  CLEANUP+=("$rootfs")
  if ! debootstrap --variant=minbase bookworm "$rootfs" >"$STATE/debootstrap.log" 2>&1; then
    say "debootstrap failed; $STATE/debootstrap.log ends:"
    tail -n 20 "$STATE/debootstrap.log" >&2
    exit 1
  fi
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  # What the slim images keep out of later installs, too.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/shardline-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  echo 'APT::Keep-Downloaded-Packages "false";' >"$rootfs/etc/apt/apt.conf.d/shardline-slim"
  tar -C "$rootfs" -c . | "$docker" import --change 'CMD ["bash"]' - "$BASE" >/dev/null
}

setup() {
  mkdir -p "$STATE"
  install_packages
  start_dockerd
  build_base
}

# The image from binaries built on this host (Debian 12, the base's glibc).
build_from_host() {
  local dir="${1:-${CARGO_TARGET_DIR:-target}/debug}" docker stage
  docker="$(docker_cli)"
  for b in "${BIN_NAMES[@]}"; do
    [[ -x "$dir/$b" ]] || { say "no $dir/$b: run cargo build --workspace --bins first"; exit 1; }
  done
  stage="$(mktemp -d)"
  CLEANUP+=("$stage")
  # Debug info is most of a debug binary: without it the image is a
  # fraction of the size, and backtraces still name functions.
  for b in "${BIN_NAMES[@]}"; do
    objcopy --strip-debug "$dir/$b" "$stage/$b"
  done
  printf 'FROM scratch\nCOPY %s /out/\n' "${BIN_NAMES[*]}" >"$stage/Dockerfile"
  local old
  old="$(image_id "$BINS")"
  DOCKER_BUILDKIT=1 "$docker" build --quiet --tag "$BINS" "$stage" >/dev/null
  replaced "$old" "$BINS"
  build_image "$BINS" ""
}

image_id() {
  "$(docker_cli)" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true
}

# A rebuild leaves the image it replaced untagged: remove it (every CI run
# would otherwise keep one more), and keep BuildKit's cache small.
replaced() {
  local old="$1" tag="$2" docker
  docker="$(docker_cli)"
  if [[ -n "$old" && "$old" != "$(image_id "$tag")" ]]; then
    "$docker" rmi "$old" >/dev/null 2>&1 || say "kept $old (still in use)"
  fi
  "$docker" builder prune --force --keep-storage 2GB >/dev/null
}

# The image from the Dockerfile's builder stage, with a builder image made
# here: the base plus this host's Rust toolchain and Debian's build tools
# (rust:1-bookworm is the public default).
build_full() {
  local docker ctx
  docker="$(docker_cli)"
  if ! "$docker" image inspect "$RUST_BASE" >/dev/null 2>&1; then
    say "building $RUST_BASE from $BASE and this host's ~/.rustup and ~/.cargo/bin"
    ctx="$(mktemp -d)"
    CLEANUP+=("$ctx")
    local toolchain
    toolchain="$(rustup show active-toolchain | cut -d' ' -f1)"
    mkdir -p "$ctx/rustup/toolchains" "$ctx/cargo/bin"
    cp -a "$HOME/.rustup/toolchains/$toolchain" "$ctx/rustup/toolchains/"
    cp -a "$HOME/.rustup/settings.toml" "$ctx/rustup/" 2>/dev/null || true
    cp -a "$HOME/.cargo/bin/cargo" "$HOME/.cargo/bin/rustc" "$HOME/.cargo/bin/rustup" "$ctx/cargo/bin/"
    # This machine's trusted roots for cargo's downloads (a machine behind
    # a TLS-inspecting proxy trusts more than Debian's list).
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-roots.crt"
    cat >"$ctx/Dockerfile" <<EOF
FROM $BASE
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libssl-dev zlib1g-dev ca-certificates python3 \
    && rm -rf /var/lib/apt/lists/*
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
COPY host-roots.crt /etc/ssl/host-roots.crt
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:\$PATH \
    CARGO_HTTP_CAINFO=/etc/ssl/host-roots.crt
RUN rustup default $toolchain && cargo --version
EOF
    DOCKER_BUILDKIT=1 "$docker" build --network host --tag "$RUST_BASE" "$ctx"
  fi
  build_image builder "$RUST_BASE"
}

# BINARIES: an image with /out/<binaries>, or `builder`; RUST: the builder
# image when BINARIES is `builder`.
build_image() {
  local binaries="$1" rust="$2" docker version revision
  docker="$(docker_cli)"
  version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
  revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  local args=(--build-arg "BASE=$BASE" --build-arg "BINARIES=$binaries"
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
  [[ -n "$rust" ]] && args+=(--build-arg "RUST=$rust")
  # Host network: the build's apt-get (runtime libraries) has no bridge.
  local old
  old="$(image_id "$IMAGE")"
  DOCKER_BUILDKIT=1 "$docker" build --network host "${args[@]}" --tag "$IMAGE" . >&2
  replaced "$old" "$IMAGE"
  say "built $IMAGE: $("$docker" image inspect --format '{{.Size}}' "$IMAGE") bytes"
}

compose_check() {
  local file=deploy/compose/docker-compose.yml rendered missing=0
  rendered="$(docker-compose --file "$file" config)"
  # Every bind mount's source (absolute once rendered) must exist.
  while read -r source; do
    if [[ ! -e "$source" ]]; then
      say "$file mounts $source, which does not exist"
      missing=1
    fi
  done < <(sed -n 's/^    - \(\/[^:]*\):.*/\1/p' <<<"$rendered")
  ((missing == 0)) || exit 1
  say "$file: valid, every mounted file present"
}

case "${1:-}" in
  setup) setup ;;
  build) setup; build_from_host "${2:-}" ;;
  build-full) setup; build_full ;;
  compose-check) install_packages; compose_check ;;
  *)
    echo "usage: scripts/image.sh setup | build [BIN_DIR] | build-full | compose-check" >&2
    exit 2
    ;;
esac
