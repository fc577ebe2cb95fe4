# tallyd's container image. Build: scripts/image.sh (or docker build -t tallyd .)
#   user        tallyd, uid:gid 10001:10001 (non-root)
#   config      /etc/tallyd/tallyd.toml (the shipped config; mount your own over it)
#   data        /var/lib/tallyd, a volume: the working directory and the SQLite store
#   entrypoint  /usr/local/bin/tallyd, default command: run --config /etc/tallyd/tallyd.toml
#   port        8080: HTTP API, /metrics, /healthz, /readyz
# scripts/image.sh check verifies these facts against the repository (run by
# scripts/test.sh).

# Build stage: compile the release binary (librdkafka is built from source by rdkafka-sys).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock openapi.yaml ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY config ./config
RUN cargo build --release --locked --bin tallyd

# Runtime stage: a small Debian image with only the binary and its config.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tallyd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tallyd --create-home tallyd
COPY --from=build /src/target/release/tallyd /usr/local/bin/tallyd
COPY config/tallyd.toml /etc/tallyd/tallyd.toml
USER 10001:10001
WORKDIR /var/lib/tallyd
VOLUME /var/lib/tallyd
ENV TALLYD_STORE__URL=sqlite:///var/lib/tallyd/tallyd.db \
    TALLYD_HTTP__LISTEN=0.0.0.0:8080
# The binary runs on this base image and accepts its own config and environment.
RUN ["/usr/local/bin/tallyd", "--version"]
RUN ["/usr/local/bin/tallyd", "check-config", "--config", "/etc/tallyd/tallyd.toml"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tallyd"]
CMD ["run", "--config", "/etc/tallyd/tallyd.toml"]
