# `make demo` runs the local demo; `make test` runs everything CI runs. A plain `cargo test` runs only the
# unit and property tests (no Go, no cluster); the end-to-end tiers need `--features e2e`, which `make test`
# turns on.
SHELL := /bin/bash
CP := hack/control-plane.sh

.PHONY: test test-kube-version lint control-plane control-plane-stop crd chart-readme krew bench demo image-binary images

# The node tier (tests/e2e_node.rs) runs last, on a real node started only for it. The benches are not
# built here (a release build of their own): `lint` type-checks them (clippy --all-targets).
test: lint control-plane
	hack/python-env.sh
	@set -euo pipefail; eval "$$(MESH_CP_NODE=1 $(CP) ensure)"; \
	  trap 'hack/node.sh stop || true; $(CP) stop; MESH_CP_DIR=$$PWD/_output/cp-faults $(CP) stop' EXIT; \
	  cargo test --workspace --locked --features mesh-operator/e2e --no-fail-fast -- --test-threads=4 --skip on_a_real_node; \
	  $(MAKE) --no-print-directory images; \
	  hack/node.sh start; \
	  cargo test --locked --features e2e --test e2e_node -- --nocapture on_a_real_node

## The control-plane suite (all but the node tier) against another Kubernetes release: the chart's oldest
## and newest supported (Chart.yaml kubeVersion), e.g. `make test-kube-version K8S=v1.33.13`.
test-kube-version: lint
	@test -n "$(K8S)" || { echo "usage: make test-kube-version K8S=v1.33.13" >&2; exit 2; }
	@set -euo pipefail; export MESH_K8S_VERSION=$(K8S) MESH_CP_DIR=$$PWD/_output/cp-$(K8S); eval "$$($(CP) ensure)"; \
	  trap '$(CP) stop; MESH_CP_DIR=$$PWD/_output/cp-faults $(CP) stop' EXIT; \
	  cargo test --workspace --locked --features mesh-operator/e2e --no-fail-fast -- --test-threads=4 --skip on_a_real_node

## The static binaries the Dockerfile ships, built by the Dockerfile's own command (no Docker engine needed).
STATIC := target/x86_64-unknown-linux-gnu/release
image-binary:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu -p mesh-operator -p mesh-agent -p rendezvous --bin mesh-operator --bin mesh-agent --bin rendezvous
	@for b in mesh-operator mesh-agent rendezvous; do \
	  ldd $(STATIC)/$$b 2>&1 | grep -qE "not a dynamic executable|statically linked" || { echo "$$b is not static" >&2; exit 1; }; done
	@echo "static binaries: $(STATIC)/{mesh-operator,mesh-agent,rendezvous}"

## The images (operator, agent, rendezvous, pause) as OCI archives in _output/images, for the local node.
images: image-binary
	hack/image.py dockerfile Dockerfile operator mesh.local/mesh-operator:dev _output/images/operator.tar --context build=$(STATIC)
	hack/image.py dockerfile Dockerfile agent mesh.local/mesh-agent:dev _output/images/agent.tar --context build=$(STATIC)
	hack/image.py dockerfile Dockerfile rendezvous mesh.local/rendezvous:dev _output/images/rendezvous.tar --context build=$(STATIC)
	hack/image.py files mesh.local/pause:dev _output/images/pause.tar --file /pause=$$(hack/node.sh build)/pause --user 65535:65535 --entrypoint '["/pause"]'

## The local demo: control plane, rendezvous simulator, 30 agents in 3 zones, the operator, an outage.
demo:
	hack/demo.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

## Builds kube-apiserver, kubectl, etcd and helm from their pinned Go modules (cached by pin).
control-plane:
	$(CP) build

control-plane-stop:
	hack/node.sh stop
	$(CP) stop
	MESH_CP_DIR=$$PWD/_output/cp-faults $(CP) stop

## Regenerates the checked-in CRD from src/api.rs.
crd:
	cargo run --quiet -- crd > crds/meshpolicy.yaml
	cp crds/meshpolicy.yaml deploy/helm/mesh-operator/files/crds/meshpolicy.yaml

## kubectl-mesh for krew: the static binary packed with its manifest into dist/. URI is where the archive
## will be served; `kubectl krew install --manifest=dist/mesh.yaml` (add --archive=… before it is served).
krew:
	@test -n "$(URI)" || { echo "usage: make krew URI=https://…/kubectl-mesh_linux_amd64.tar.gz" >&2; exit 2; }
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu -p mesh-operator --bin kubectl-mesh
	hack/krew-package.py --binary $(STATIC)/kubectl-mesh --version v$$(cargo pkgid -p mesh-operator | sed 's/.*[#@]//') --uri "$(URI)" --out dist

## Regenerates the chart's README from the comments in its values.yaml.
chart-readme:
	hack/chart-readme.py

bench:
	cargo bench --bench planner
