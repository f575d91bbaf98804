# `make demo` runs the local demo; `make test` runs everything CI runs.
SHELL := /bin/bash
CP := hack/control-plane.sh

.PHONY: test lint control-plane control-plane-stop crd bench demo image-binary

test: lint control-plane
	@set -euo pipefail; eval "$$($(CP) ensure)"; trap '$(CP) stop; MESH_CP_DIR=$$PWD/_output/cp-faults $(CP) stop' EXIT; \
	  cargo test --workspace --locked --no-fail-fast -- --test-threads=4; \
	  cargo bench --no-run --locked; \
	  $(MAKE) --no-print-directory image-binary

## The static binary the Dockerfile ships, built by the Dockerfile's own command (no Docker engine needed).
image-binary:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu --bin mesh-operator
	@file target/x86_64-unknown-linux-gnu/release/mesh-operator 2>/dev/null | grep -q "static" || \
	  ldd target/x86_64-unknown-linux-gnu/release/mesh-operator 2>&1 | grep -q "not a dynamic executable"
	@echo "static binary: target/x86_64-unknown-linux-gnu/release/mesh-operator"

## The local demo: control plane, rendezvous simulator, 30 agents in 3 zones, the operator, an outage.
demo:
	hack/demo.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## Builds kube-apiserver, kubectl, etcd and helm from their pinned Go modules (cached by pin).
control-plane:
	$(CP) build

control-plane-stop:
	$(CP) stop
	MESH_CP_DIR=$$PWD/_output/cp-faults $(CP) stop

## Regenerates the checked-in CRD from src/api.rs.
crd:
	cargo run --quiet -- crd > crds/meshpolicy.yaml
	cp crds/meshpolicy.yaml deploy/helm/mesh-operator/crds/meshpolicy.yaml

bench:
	cargo bench --bench planner
