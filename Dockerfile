# Build stage: compile the release binary (librdkafka is built from source by rdkafka-sys).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY config ./config
RUN cargo build --release --locked --bin tallyd

# Runtime stage: a small Debian image with only the binary and its config.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/tallyd --create-home tallyd
COPY --from=build /src/target/release/tallyd /usr/local/bin/tallyd
COPY config/tallyd.toml /etc/tallyd/tallyd.toml
USER tallyd
WORKDIR /var/lib/tallyd
ENV TALLYD_STORE__URL=sqlite:///var/lib/tallyd/tallyd.db \
    TALLYD_HTTP__LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tallyd"]
CMD ["run", "--config", "/etc/tallyd/tallyd.toml"]
