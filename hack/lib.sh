# Shared by hack/control-plane.sh and hack/node.sh: messages, and building pinned Go commands into a cache
# keyed by every pin. The caller sets ROOT, TOOLS and SELF (its name, for messages).

die() { echo "$SELF: error: $*" >&2; exit 1; }
note() { echo "$SELF: $*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pinned_k8s() { awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$TOOLS/kubernetes/go.mod"; }

k8s_version() { echo "${MESH_K8S_VERSION:-$(pinned_k8s)}"; }

# The module Kubernetes commands are built from: hack/tools/kubernetes, or, with MESH_K8S_VERSION set to
# another release (the chart's oldest and newest supported), a module for that release generated once
# under _output from the pinned one (the same staging-module replaces, at that release's versions).
k8s_module() {
  local v; v=$(k8s_version)
  if [ "$v" = "$(pinned_k8s)" ]; then echo "$TOOLS/kubernetes"; return; fi
  [[ "$v" =~ ^v1\.[0-9]+\.[0-9]+$ ]] || die "MESH_K8S_VERSION=$v: expected a release like v1.33.13"
  local dir=$ROOT/_output/k8s-$v
  if [ ! -f "$dir/go.sum" ]; then
    note "generating a module for Kubernetes $v in $dir"
    mkdir -p "$dir"
    { printf 'module mesh-operator/k8s-%s\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\n' "$v" "$v"
      sed -n '/^replace (/,/^)/p' "$TOOLS/kubernetes/go.mod" | sed -E "s/ v0\.[0-9]+\.[0-9]+$/ v0.${v#v1.}/"
    } >"$dir/go.mod"
    sed '/kube-controller-manager\|kube-proxy\|kube-scheduler\|kubelet/d' "$TOOLS/kubernetes/tools.go" >"$dir/tools.go"
    (cd "$dir" && go mod tidy >"$dir/tidy.log" 2>&1) || { rm -f "$dir/go.sum"; die "go mod tidy for $v failed: $dir/tidy.log"; }
  fi
  echo "$dir"
}

# The cache key covers every pin (go.mod and go.sum of each tool module) and the Go toolchain.
cache_dir() {
  command -v go >/dev/null || die "no 'go' on PATH: install Go 1.26 or newer (the Kubernetes pins need it)"
  local key mod; mod=$(k8s_module)
  key=$( { cat "$TOOLS"/*/go.mod "$TOOLS"/*/go.sum "$mod/go.mod" "$mod/go.sum"; go version; echo "$BUILD_REV"; } |
    sha256sum | cut -c1-12)
  echo "${MESH_CACHE_DIR:-$HOME/.cache/mesh-operator}/$(k8s_version)-$key"
}

# Bump when the way binaries are built changes, so caches built the old way are not reused.
BUILD_REV=2

build_one() { # module-dir (under hack/tools, or absolute) output-name package cache-dir [ldflags] [build tags]
  local dir=$1 out=$2 pkg=$3 bin=$4 ldflags=${5:-} tags=${6:-}
  [[ "$dir" = /* ]] || dir=$TOOLS/$dir
  [ -x "$bin/$out" ] && return 0
  note "building $out from $pkg (pinned in ${dir#"$ROOT"/}/go.mod)"
  local log; log=$(mktemp)
  if ! (cd "$dir" && CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$bin/.$out.tmp" "$pkg") >"$log" 2>&1; then
    if grep -q 'missing go.sum entry' "$log"; then
      sed 's/^/  /' "$log" | tail -10 >&2
      die "$dir/go.sum lacks entries for $pkg: run 'go mod tidy' there (and import $pkg in its tools.go)"
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
