#!/usr/bin/env bash
# Prints the directory holding the Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule,
# ...) at the release pinned below, taken from its Go module (the Go module proxy serves it; the checksum
# database verifies it). tests/e2e_helm.rs installs them to check the chart's monitoring objects against
# their real schemas.
set -euo pipefail
VERSION=v0.85.0
command -v go >/dev/null || { echo "monitoring-crds.sh: error: no 'go' on PATH" >&2; exit 1; }
dir=$(cd "${TMPDIR:-/tmp}" && go mod download -json "github.com/prometheus-operator/prometheus-operator@$VERSION" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
[ -d "$dir/example/prometheus-operator-crd" ] || { echo "monitoring-crds.sh: error: no CRDs under $dir" >&2; exit 1; }
echo "$dir/example/prometheus-operator-crd"
