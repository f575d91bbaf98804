# Shared by hack/control-plane.sh and hack/node.sh: messages, and building pinned Go commands into a cache
# keyed by every pin. The caller sets ROOT, TOOLS and SELF (its name, for messages).

die() { echo "$SELF: error: $*" >&2; exit 1; }
note() { echo "$SELF: $*" >&2; }

k8s_version() { awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$TOOLS/kubernetes/go.mod"; }

# The cache key covers every pin (go.mod and go.sum of each tool module) and the Go toolchain.
cache_dir() {
  command -v go >/dev/null || die "no 'go' on PATH: install Go 1.26 or newer (the Kubernetes pins need it)"
  local key
  key=$( { cat "$TOOLS"/*/go.mod "$TOOLS"/*/go.sum; go version; echo "$BUILD_REV"; } | sha256sum | cut -c1-12)
  echo "${MESH_CACHE_DIR:-$HOME/.cache/mesh-operator}/$(k8s_version)-$key"
}

# Bump when the way binaries are built changes, so caches built the old way are not reused.
BUILD_REV=2

build_one() { # module-dir output-name package cache-dir [ldflags] [build tags]
  local dir=$1 out=$2 pkg=$3 bin=$4 ldflags=${5:-} tags=${6:-}
  [ -x "$bin/$out" ] && return 0
  note "building $out from $pkg (pinned in hack/tools/$dir/go.mod)"
  local log; log=$(mktemp)
  if ! (cd "$TOOLS/$dir" && CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$bin/.$out.tmp" "$pkg") >"$log" 2>&1; then
    if grep -q 'missing go.sum entry' "$log"; then
      sed 's/^/  /' "$log" | tail -10 >&2
      die "hack/tools/$dir/go.sum lacks entries for $pkg: run 'go mod tidy' there (and import $pkg in its tools.go)"
    fi
    if grep -qE 'dial tcp|no such host|GOPROXY|proxy\.golang|reading .*: (404|410)|unknown revision|verifying module' "$log"; then
      sed 's/^/  /' "$log" | tail -20 >&2
      die "could not download the Go modules for $out: is the Go module proxy reachable (GOPROXY=$(go env GOPROXY))?"
    fi
    sed 's/^/  /' "$log" | tail -40 >&2
    die "building $out failed (full log: $log)"
  fi
  rm -f "$log"
  mv "$bin/.$out.tmp" "$bin/$out"
}


# The release stamped into Kubernetes binaries (as the release build does), so version skew checks work.
k8s_stamp() {
  local v; v=$(k8s_version)
  local minor=${v#v1.}; minor=${minor%%.*}
  local stamp="-X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1"
  stamp+=" -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  stamp+=" -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1"
  echo "$stamp -X k8s.io/client-go/pkg/version.gitMinor=$minor"
}

# Takes the build lock of cache directory $1 on fd 8: parallel callers must not build the same thing twice.
lock_cache() {
  mkdir -p "$1"
  exec 8>"$1/.lock"
  flock 8
}
