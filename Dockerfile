# syntax=docker/dockerfile:1
# Build: a static binary (glibc, statically linked), the same command `make image-binary` runs in CI.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src src
COPY crates crates
COPY crds crds
COPY deploy/helm/mesh-operator/crds deploy/helm/mesh-operator/crds
COPY benches benches
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu --bin mesh-operator \
 && install -D target/x86_64-unknown-linux-gnu/release/mesh-operator /out/mesh-operator

# Run: nothing but the binary, as an unprivileged user, on a read-only root.
FROM scratch
COPY --from=build /out/mesh-operator /mesh-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/mesh-operator"]
CMD ["run"]
