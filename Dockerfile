# syntax=docker/dockerfile:1
# One image for the whole workspace: backend, gateway and loadtest live in
# /usr/local/bin and each compose service picks its command.
#
#   docker build -t feedgate .
#   docker run --rm -e JWT_SECRET=... feedgate gateway --help

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# cmake: aws-lc-sys (rustls, pulled in by lapin) may want it on some targets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The target dir and the registry are cache mounts (BuildKit), so the
# binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/backend target/release/gateway target/release/loadtest /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: amqps:// and rediss:// URLs; curl: the healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin feedgate
COPY --from=builder /out/ /usr/local/bin/
USER feedgate
EXPOSE 8080 8084
# The gateway by default; compose sets the command per service
# (`backend`, `gateway`, `loadtest run ...`).
CMD ["gateway"]
