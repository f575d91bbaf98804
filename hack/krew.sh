#!/usr/bin/env bash
# Prints the path of a krew binary built from the module pinned in hack/krew (for the test that installs
# kubectl-mesh from its krew manifest). Cached by the pin and the Go toolchain in MESH_CACHE_DIR (default
# ~/.cache/mesh-operator). Kept out of hack/tools so a krew bump does not rebuild the control plane.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=$ROOT/hack/tools
SELF=krew.sh
# shellcheck source=hack/lib.sh
source "$ROOT/hack/lib.sh"
command -v go >/dev/null || die "no 'go' on PATH: Go builds krew"
key=$( { cat "$ROOT/hack/krew/go.mod" "$ROOT/hack/krew/go.sum"; go version; } | sha256sum | cut -c1-12)
bin=${MESH_CACHE_DIR:-$HOME/.cache/mesh-operator}/krew-$key
mkdir -p "$bin"
build_one "$ROOT/hack/krew" krew sigs.k8s.io/krew/cmd/krew "$bin"
echo "$bin/krew"
