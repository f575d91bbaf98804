# `make demo` runs the local demo; `make test` runs everything CI runs.
SHELL := /bin/bash
CP := hack/control-plane.sh

.PHONY: test lint unit e2e control-plane control-plane-stop crd bench

test: lint control-plane
	@set -euo pipefail; eval "$$($(CP) ensure)"; trap '$(CP) stop' EXIT; \
	  cargo test --locked -- --test-threads=4; \
	  cargo bench --no-run --locked

lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

## Builds kube-apiserver, kubectl, etcd and helm from their pinned Go modules (cached by pin).
control-plane:
	$(CP) build

control-plane-stop:
	$(CP) stop

## Regenerates the checked-in CRD from src/api.rs.
crd:
	cargo run --quiet -- crd > crds/meshpolicy.yaml

bench:
	cargo bench --bench planner
