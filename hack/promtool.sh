#!/usr/bin/env bash
# Prints the path of a promtool, for the alert tests (tests/e2e_helm.rs). One on PATH wins; otherwise
# Debian's `prometheus` package, pinned below, is downloaded once and only promtool is kept, in
# MESH_CACHE_DIR (default ~/.cache/mesh-operator). Nothing is installed and no service is started.
set -euo pipefail
SELF=promtool.sh
VERSION=2.42.0+ds-5+deb12u1
die() { echo "$SELF: error: $*" >&2; exit 1; }

if command -v promtool >/dev/null; then command -v promtool; exit 0; fi
dir=${MESH_CACHE_DIR:-$HOME/.cache/mesh-operator}/promtool-$VERSION
if [ ! -x "$dir/promtool" ]; then
  command -v apt-get >/dev/null || die "no promtool on PATH and no apt-get to fetch Debian's prometheus $VERSION"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  fetch() { (cd "$work" && apt-get download -q "prometheus=$VERSION" >/dev/null 2>&1); }
  fetch || { apt-get update -qq >/dev/null 2>&1 || true; fetch; } ||
    die "apt-get download prometheus=$VERSION failed: put a promtool on PATH instead"
  dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
  mkdir -p "$dir"
  install -m 0755 "$work/x/usr/bin/promtool" "$dir/promtool.tmp"
  mv "$dir/promtool.tmp" "$dir/promtool"
fi
echo "$dir/promtool"
