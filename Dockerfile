# syntax=docker/dockerfile:1
#
# quicnprotochat delivery server image.
#
#   docker build -t quicnprotochat-server .
#   docker run ... quicnprotochat-server        (see docs/src/operations.md)
#
# Base images are pinned by version tag, not by digest: digests could not be
# looked up where this file was written. Dependabot (.github/dependabot.yml,
# "docker" ecosystem) proposes tag updates; pin digests when it does.
# Builder and runtime are both Debian 12 (bookworm), so the libcrypto the
# binary links against at build time is the one the runtime image ships.

########################################################################
# Builder
########################################################################
FROM rust:1.95-slim-bookworm AS builder

# SQLCipher (rusqlite's bundled-sqlcipher) links the system libcrypto.
# Debian package versions are not pinned: the bookworm security archive drops
# superseded versions, so a pin would break rebuilds after every security fix.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# --- Dependency cache layer ------------------------------------------------
# Only the manifests and stub sources are copied here, so this layer (all
# third-party crates, compiled) is rebuilt only when a manifest or Cargo.lock
# changes, never for a source-only change.
# Every workspace member must appear below (manifest + stub sources):
# crates/quicnprotochat-server/tests/packaging.rs fails when one is missing.
COPY Cargo.toml Cargo.lock ./
COPY crates/quicnprotochat-proto/Cargo.toml crates/quicnprotochat-proto/Cargo.toml
COPY crates/quicnprotochat-core/Cargo.toml crates/quicnprotochat-core/Cargo.toml
COPY crates/quicnprotochat-server/Cargo.toml crates/quicnprotochat-server/Cargo.toml
COPY crates/quicnprotochat-client/Cargo.toml crates/quicnprotochat-client/Cargo.toml
COPY crates/quicnprotochat-p2p/Cargo.toml crates/quicnprotochat-p2p/Cargo.toml
# Stub every target file the manifests name (libraries, binaries, the
# explicit [[test]] and [[bench]] targets), so cargo accepts the workspace.
RUN set -eux; \
    for f in \
        crates/quicnprotochat-proto/src/lib.rs \
        crates/quicnprotochat-core/src/lib.rs \
        crates/quicnprotochat-core/tests/tests.rs \
        crates/quicnprotochat-server/src/lib.rs \
        crates/quicnprotochat-server/tests/tests.rs \
        crates/quicnprotochat-client/src/lib.rs \
        crates/quicnprotochat-client/tests/tests.rs \
        crates/quicnprotochat-p2p/src/lib.rs; \
    do mkdir -p "$(dirname "$f")"; : > "$f"; done; \
    for f in \
        crates/quicnprotochat-server/src/main.rs \
        crates/quicnprotochat-client/src/main.rs \
        crates/quicnprotochat-client/src/bin/load.rs \
        crates/quicnprotochat-client/src/bin/soak.rs \
        crates/quicnprotochat-core/benches/mls.rs \
        crates/quicnprotochat-server/benches/store.rs; \
    do mkdir -p "$(dirname "$f")"; echo 'fn main() {}' > "$f"; done
RUN cargo build --release --locked -p quicnprotochat-server --bin quicnprotochat-server

# --- Our sources -------------------------------------------------------------
COPY . .
# The git revision the metrics report (quicnprotochat_build_info); the build
# context has no .git: pass --build-arg QUICNPROTOCHAT_GIT_REVISION=$(git rev-parse HEAD).
ARG QUICNPROTOCHAT_GIT_REVISION=unknown
# COPY keeps the sources' original mtimes, which are older than the stubs'
# build outputs: touch them so cargo rebuilds our crates (and only those).
RUN find crates -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p quicnprotochat-server --bin quicnprotochat-server \
 && install -D -m 0755 target/release/quicnprotochat-server /out/quicnprotochat-server \
 && install -d -m 0700 /out/rootfs/data

########################################################################
# Runtime: distroless, no shell, no package manager. cc-debian12 ships glibc,
# libgcc and libssl3 (libcrypto), which is all the binary links against.
# The ":nonroot" tag is only an explicit tag; USER below overrides its 65532.
########################################################################
FROM gcr.io/distroless/cc-debian12:nonroot

# The service runs as the dedicated numeric UID:GID 10001:10001 (not
# distroless's 65532 "nonroot", not nobody): numeric so Kubernetes
# runAsNonRoot can verify it; no /etc/passwd entry is needed.
COPY --from=builder /out/quicnprotochat-server /usr/local/bin/quicnprotochat-server
# The data directory (SQLCipher database, WAL) is owned by the service user and
# mode 0700; a named volume mounted here inherits both. COPY of a directory
# copies its contents and creates the destination 0755, so the directory is
# copied from its parent: then it is content and keeps its own mode.
COPY --from=builder --chown=10001:10001 /out/rootfs/ /

# Production by default: without QUICNPROTOCHAT_AUTH_TOKEN (>= 32 bytes),
# QUICNPROTOCHAT_DB_KEY (64 hex) and QUICNPROTOCHAT_CERT/QUICNPROTOCHAT_KEY
# the server refuses to start. Nothing secret is baked into the image.
ENV QUICNPROTOCHAT_MODE=production \
    QUICNPROTOCHAT_LISTEN=0.0.0.0:4433 \
    QUICNPROTOCHAT_DATA_DIR=/data \
    RUST_LOG=info

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]

# QUIC runs over UDP.
EXPOSE 4433/udp

# The server's own probe: a QUIC connection to the health RPC, pinning the
# configured certificate (a QUIC server has no TCP port to curl, and the
# image has no shell).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/quicnprotochat-server", "health", "--timeout-secs", "5"]

ENTRYPOINT ["/usr/local/bin/quicnprotochat-server"]
CMD ["serve"]
