# syntax=docker/dockerfile:1
# Build: static binaries (glibc, statically linked), the same command `make image-binary` runs in CI.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src src
COPY crates crates
COPY crds crds
COPY deploy/helm/mesh-operator/crds deploy/helm/mesh-operator/crds
COPY benches benches
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p mesh-operator -p mesh-agent -p rendezvous --bin mesh-operator --bin mesh-agent --bin rendezvous \
 && for b in mesh-operator mesh-agent rendezvous; do install -D target/x86_64-unknown-linux-gnu/release/$b /out/$b; done

# The runtime stages: nothing but one binary, as an unprivileged user, on a read-only root. `make images`
# builds the same stages without a container engine (hack/image.py carries out these very instructions).

# The agent (`docker build --target agent`): the reference agent built on the agent-mesh library.
FROM scratch AS agent
COPY --from=build /out/mesh-agent /mesh-agent
USER 65532:65532
EXPOSE 3001
ENTRYPOINT ["/mesh-agent"]

# The rendezvous sync hub the end-to-end tests and the demo run agents against (`--target rendezvous`).
FROM scratch AS rendezvous
COPY --from=build /out/rendezvous /rendezvous
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/rendezvous"]

# The operator: the default target, last.
FROM scratch AS operator
COPY --from=build /out/mesh-operator /mesh-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/mesh-operator"]
CMD ["run"]
