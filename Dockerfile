# syntax=docker/dockerfile:1
#
# One image for the split deployment: command-api, query-api and aggregator. The container's
# command picks the binary, e.g.
#
#   docker build -t identity-service .
#   docker run --rm identity-service command-api --help
#   docker run --rm identity-service aggregator status
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.
# Pin the toolchain for a reproducible release build, e.g. --build-arg RUST_VERSION=1.95
# (the workspace needs 1.88 or later); in a release pipeline pin both base images by digest.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src

# The whole workspace is needed: cargo reads every member's manifest, and the SQL migrations
# are embedded into the binaries at compile time (sqlx::migrate!). .dockerignore keeps target/,
# .git and local data out of the context.
COPY . .

# Cache mounts keep the crates.io downloads and the compiled dependencies between builds; the
# binaries are copied out of the cached target/ within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p command-api -p query-api -p aggregator \
    && mkdir -p /out \
    && cp target/release/command-api target/release/query-api target/release/aggregator /out/

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# ca-certificates for outbound TLS (e.g. to PostgreSQL once sqlx is built with a TLS feature).
# It pulls in the openssl CLI, which docker-compose's dev key generator uses. No curl: the
# compose health checks use bash's /dev/tcp, and Kubernetes probes are plain httpGet.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid/gid, so Kubernetes' runAsUser/runAsNonRoot and volume ownership match.
RUN groupadd --system --gid 10001 identity \
    && useradd --system --uid 10001 --gid identity --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin identity

COPY --from=builder /out/command-api /out/query-api /out/aggregator /usr/local/bin/

# The binaries read no files but an optional --config FILE (or IDENTITY_CONFIG); everything
# else comes from IDENTITY__SECTION__KEY variables. The root filesystem may be read-only.
ENV IDENTITY__LOG__FORMAT=json
USER 10001:10001

# command-api 8080, query-api 8081, aggregator 8082 (/healthz, /readyz, /metrics only).
EXPOSE 8080 8081 8082

# Every binary stops cleanly on SIGTERM (in-flight requests and batches finish).
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["command-api"]
