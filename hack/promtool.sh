#!/usr/bin/env bash
# Prints the path of a promtool, for the alert tests (tests/e2e_helm.rs). One on PATH wins; otherwise
# Debian's `prometheus` package is downloaded once (the version pinned below, or, when the mirror has moved
# on, the one it serves) and only promtool is kept, in MESH_CACHE_DIR (default ~/.cache/mesh-operator).
# Nothing is installed and no service is started.
set -euo pipefail
SELF=promtool.sh
PINNED=2.42.0+ds-5+deb12u1
die() { echo "$SELF: error: $*" >&2; exit 1; }

if command -v promtool >/dev/null; then command -v promtool; exit 0; fi
dir=${MESH_CACHE_DIR:-$HOME/.cache/mesh-operator}/promtool-debian
if [ ! -x "$dir/promtool" ]; then
  command -v apt-get >/dev/null || die "no promtool on PATH and no apt-get to fetch Debian's prometheus package"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  fetch() { (cd "$work" && apt-get download -q "$1" >/dev/null 2>&1); }
  fetch "prometheus=$PINNED" || { apt-get update -qq >/dev/null 2>&1 || true; fetch "prometheus=$PINNED"; } ||
    fetch prometheus || die "apt-get download prometheus failed: put a promtool on PATH instead"
  dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
  mkdir -p "$dir"
  install -m 0755 "$work/x/usr/bin/promtool" "$dir/promtool.tmp"
  mv "$dir/promtool.tmp" "$dir/promtool"
fi
echo "$dir/promtool"
