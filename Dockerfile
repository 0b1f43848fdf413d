# svcproxy's container image: `docker build -t ghcr.io/svcproxy/svcproxy:v0.1.0 .`
# (the registry name is a placeholder; see deploy/README.md).

# Build stage: the release binary, with exactly the dependency versions of Cargo.lock.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin svcproxy

# Runtime: the same Debian release as the build stage (same glibc), plus the tools svcproxy runs:
# nft (nftables) to apply rulesets, iptables (both variants) for `mode: iptables`. Stale UDP
# conntrack entries are deleted by svcproxy itself, over netlink (no conntrack-tools).
# ca-certificates only matters for a kubeconfig without a CA (in-cluster always has one).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/svcproxy /usr/local/bin/svcproxy
ENTRYPOINT ["/usr/local/bin/svcproxy"]
