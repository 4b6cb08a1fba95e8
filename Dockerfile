# syntax=docker/dockerfile:1
# Build: docker build -t mantlegate .
# Run:   docker run -p 8080:8080 -e BEDROCK_API_KEY -v ./mantlegate.toml:/etc/mantlegate/mantlegate.toml:ro -v mantlegate-ledger:/var/lib/mantlegate mantlegate
# A fleet (two replicas, PostgreSQL, Redis): compose.yaml.
# scripts/check-docker-context.sh (part of scripts/test.sh) compiles what the COPY lines of the
# build stage copy, as a clean clone has it.

# At least Cargo.toml's `rust-version`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them: built for the manifest and lock
# file with an empty library and binary, whose own artifacts are then dropped.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && cargo clean --release --locked --package mantlegate \
    && rm -r src
# Everything the crate reads at compile time (include_str!): its sources, the built-in prices,
# the demo and example configs, the PostgreSQL migrations.
COPY src ./src
COPY config ./config
COPY migrations ./migrations
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin mantlegate \
    && mkdir -p /etc/mantlegate /var/lib/mantlegate \
    && chown mantlegate /var/lib/mantlegate
COPY --from=build /src/target/release/mantlegate /usr/local/bin/mantlegate
COPY config/mantlegate.example.toml /etc/mantlegate/mantlegate.example.toml
USER mantlegate
WORKDIR /var/lib/mantlegate
# The SQLite ledger (`[ledger] path`, relative to this directory) and the records a shutdown
# could not write to the ledger: kept on a volume, so that they outlive the container. Declared
# after the chown above, so a new volume starts out owned by mantlegate.
VOLUME /var/lib/mantlegate
EXPOSE 8080
# Healthy when /readyz answers 200: the config is loaded and upstream credentials are present.
# The image has no curl; mantlegate probes itself. A --listen other than the CMD's port needs
# its own HEALTHCHECK (or `mantlegate health --url http://127.0.0.1:PORT/readyz`).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["mantlegate", "health", "--url", "http://127.0.0.1:8080/readyz", "--timeout", "3s"]
ENTRYPOINT ["mantlegate"]
CMD ["serve", "--config", "/etc/mantlegate/mantlegate.toml", "--listen", "0.0.0.0:8080"]
