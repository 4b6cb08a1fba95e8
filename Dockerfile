# syntax=docker/dockerfile:1
# Build: docker build -t mantlegate .
# Run:   docker run -p 8080:8080 -e BEDROCK_API_KEY -v ./mantlegate.toml:/etc/mantlegate/mantlegate.toml:ro mantlegate

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked || true
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

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
EXPOSE 8080
ENTRYPOINT ["mantlegate"]
CMD ["serve", "--config", "/etc/mantlegate/mantlegate.toml", "--listen", "0.0.0.0:8080"]
