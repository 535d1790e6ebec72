# One image for every shardline process: `shardline-coordinator` (the
# default command), `shardline-worker` and the operator CLI `shardline`.
# deploy/README.md ("Container image") walks through building and running it.
#
#   docker build -t shardline .
#   docker run -v ./coordinator.toml:/etc/shardline/coordinator.toml:ro \
#              -v shardline-data:/var/lib/shardline shardline
#   docker run -v ./worker.toml:/etc/shardline/worker.toml:ro \
#              shardline shardline-worker --config /etc/shardline/worker.toml
#
# Needs BuildKit (Docker 23 or later by default; DOCKER_BUILDKIT=1 before).
#
# Build arguments (all optional):
#   BASE      the runtime base: a Debian 12 (bookworm) image, small
#             (debian:bookworm-slim). Its glibc must be at least the
#             builder's.
#   RUST      the builder: Rust (1.85 or later) on Debian 12, so its glibc
#             matches BASE (rust:1-bookworm).
#   BINARIES  where the three binaries come from: `builder` (default)
#             compiles the workspace in release here; any other image with
#             the binaries in /out/ is taken as it is (the builder stage is
#             then skipped). scripts/image.sh passes one made from
#             binaries built on the host (a Debian 12 machine like BASE),
#             so CI does not compile the workspace a second time inside
#             Docker.
#   VERSION, REVISION, CREATED   the OCI labels of those names.
#
# Base images are build arguments so that a machine without access to a
# registry can use ones of its own (scripts/image.sh builds BASE from
# Debian's packages with debootstrap).

ARG BASE=debian:bookworm-slim
ARG RUST=rust:1-bookworm
ARG BINARIES=builder

# ---------------------------------------------------------------- builder
FROM ${RUST} AS builder
WORKDIR /src
# librdkafka (built statically by rdkafka-sys) needs a C toolchain, make,
# OpenSSL's headers and pkg-config; the rust images have them all,
# build-deps.sh adds the last two to a leaner one.
COPY scripts/build-deps.sh /usr/local/bin/shardline-build-deps
RUN shardline-build-deps
COPY . .
# Symbols stay for readable backtraces; the line tables the release
# profile keeps (debug = 1) go.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
# The crates and the target directory live in BuildKit cache mounts (the
# rust images' CARGO_HOME is /usr/local/cargo): a rebuild compiles only
# what changed, and no layer carries the gigabytes of the target.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p shardline-coordinator -p shardline-worker -p shardline \
    && mkdir /out \
    && cp target/release/shardline-coordinator target/release/shardline-worker \
          target/release/shardline /out/

# The binaries, from the builder above or from the image BINARIES names.
FROM ${BINARIES} AS bins

# ---------------------------------------------------------------- runtime
FROM ${BASE}
# What the binaries link beyond glibc: OpenSSL (librdkafka's TLS); the CA
# roots (brokers, PostgreSQL and coordinators over TLS); tini as PID 1,
# which forwards SIGTERM to the process and reaps whatever a
# `kind = "function"` handler's processes leave behind.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
         ca-certificates libssl3 tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && groupadd --gid 10001 shardline \
    && useradd --uid 10001 --gid shardline --home-dir /var/lib/shardline \
         --no-create-home --no-log-init --shell /usr/sbin/nologin shardline \
    && install -d -o shardline -g shardline -m 0750 /var/lib/shardline \
    && install -d -m 0755 /etc/shardline

COPY --from=bins /out/shardline-coordinator /out/shardline-worker /out/shardline /usr/local/bin/

# The coordinator's sled store (`data_dir` defaults to ./shardline-data,
# relative to this directory). A named volume starts as this directory,
# owned by the shardline user.
WORKDIR /var/lib/shardline
VOLUME /var/lib/shardline
USER 10001:10001

# gRPC (coordinator `listen`), and the HTTP endpoints (`metrics_listen`:
# /metrics, /healthz, /readyz) of the coordinator and the worker in the
# examples' ports. Each listens only where its config says.
EXPOSE 7400 9400 9500

# The first SIGTERM drains (the worker within `drain_timeout`), a second
# exits at once: give `docker stop -t` / terminationGracePeriodSeconds
# more than the drain (deploy/README.md, "Health and shutdown").
STOPSIGNAL SIGTERM

# Last, so that a new revision reuses every layer above from the cache.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="shardline" \
      org.opencontainers.image.description="Lambda-style event source mappings for Kafka and RabbitMQ: coordinator, worker and operator CLI" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.documentation="deploy/README.md"

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["shardline-coordinator", "--config", "/etc/shardline/coordinator.toml"]
