# syntax=docker/dockerfile:1
#
# The `delivertrack` binary in a small Debian image.
#
#   docker build -t delivertrack .
#   docker run --rm -p 8080:8080 delivertrack demo
#
# The PostgreSQL migrations are compiled into the binary; `delivertrack run` applies
# them at start.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target/ are cache mounts (kept between builds, not in the image), so
# the binary is copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p delivertrack \
    && install -m 0755 target/release/delivertrack /usr/local/bin/delivertrack

FROM debian:bookworm-slim
# ca-certificates: TLS to the services; curl: the health check on /readyz.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 delivertrack \
    && useradd --system --uid 10001 --gid delivertrack --no-create-home --shell /usr/sbin/nologin delivertrack
COPY --from=builder /usr/local/bin/delivertrack /usr/local/bin/delivertrack
USER delivertrack:delivertrack
# Inside a container the API must listen on every interface to be reachable.
ENV DELIVERTRACK_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["delivertrack"]
CMD ["run"]
