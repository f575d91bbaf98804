#!/usr/bin/env bash
# A real Kubernetes node on this machine, beside the control plane of hack/control-plane.sh: containerd
# (with Debian's runc), kubelet, kube-proxy, kube-controller-manager and kube-scheduler, all built from
# pinned Go modules (hack/tools) and cached like the control plane's binaries.
#
#   hack/node.sh build    build the node's binaries and the pause binary into the version-keyed cache
#   hack/node.sh start    start the node on the running control plane; returns once the Node is Ready
#   hack/node.sh stop     stop what start started (by PID) and undo what it changed on the machine
#   hack/node.sh status   say what runs where
#   hack/node.sh import IMAGE.tar...   import OCI image archives into the node's containerd
#
# Needs root (the kubelet and containerd manage cgroups, mounts and network namespaces), runc, iptables and
# a control plane started by hack/control-plane.sh. State lives under $MESH_NODE_DIR (default
# ./_output/node); what the daemons change outside it (sysctls, cgroups, the mesh0 bridge, iptables chains,
# /run/netns and a few kubelet paths) is recorded at start and undone by stop.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/hack/tools"
STATE=${MESH_NODE_DIR:-$ROOT/_output/node}
CP_STATE=${MESH_CP_DIR:-$ROOT/_output/control-plane}
NODE_NAME=mesh-node
NODE_TAINT=agentmesh.dev/node-tier
POD_CIDR=10.88.0.0/16
SELF=node
# shellcheck source=hack/lib.sh
. "$ROOT/hack/lib.sh"

cmd_build() {
  [ "$(k8s_version)" = "$(pinned_k8s)" ] || die "the node runs the pinned Kubernetes release only (unset MESH_K8S_VERSION)"
  local bin; bin=$(cache_dir)
  lock_cache "$bin"
  local stamp; stamp=$(k8s_stamp)
  for cmd in kubelet kube-proxy kube-controller-manager kube-scheduler; do
    build_one kubernetes "$cmd" "k8s.io/kubernetes/cmd/$cmd" "$bin" "$stamp"
  done
  local tags="no_btrfs no_devmapper no_zfs"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    build_one containerd "$cmd" "github.com/containerd/containerd/v2/cmd/$cmd" "$bin" "" "$tags"
  done
  mkdir -p "$bin/cni"
  build_one cni cni/bridge github.com/containernetworking/plugins/plugins/main/bridge "$bin"
  build_one cni cni/host-local github.com/containernetworking/plugins/plugins/ipam/host-local "$bin"
  build_one cni cni/loopback github.com/containernetworking/plugins/plugins/main/loopback "$bin"
  build_pause "$bin"
  flock -u 8
  echo "$bin"
}

# The sandbox's pause process, from the C source the pinned Kubernetes release ships, linked statically.
build_pause() {
  local bin=$1 src
  [ -x "$bin/pause" ] && return 0
  command -v gcc >/dev/null || die "no 'gcc' on PATH: the pause binary is built from Kubernetes' pause.c (apt-get install gcc)"
  src=$(cd "$TOOLS/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
  [ -f "$src" ] || (cd "$TOOLS/kubernetes" && go mod download k8s.io/kubernetes)
  note "building pause from $src"
  gcc -Os -static -Wall -Werror -DVERSION="$(k8s_version)" -o "$bin/.pause.tmp" "$src" || die "building pause failed"
  mv "$bin/.pause.tmp" "$bin/pause"
}

# --- prerequisites ------------------------------------------------------------------------------------------

cp_file() { cat "$CP_STATE/$1" 2>/dev/null || die "no running control plane in $CP_STATE ($1 is missing): run 'hack/control-plane.sh start' first"; }

check_prerequisites() {
  [ "$(id -u)" = 0 ] || die "must run as root: the kubelet and containerd manage cgroups, mounts and network namespaces"
  for tool in runc iptables iptables-save iptables-restore nft ip findmnt openssl; do
    command -v "$tool" >/dev/null || die "no '$tool' on PATH (apt-get install runc iptables nftables iproute2 util-linux openssl)"
  done
  [ -d /sys/fs/cgroup/memory ] || [ -f /sys/fs/cgroup/cgroup.controllers ] || die "no cgroup hierarchy under /sys/fs/cgroup"
  grep -qw overlay /proc/filesystems || die "the kernel lacks overlayfs (containerd's snapshotter needs it)"
  [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || die "no br_netfilter (/proc/sys/net/bridge): Service traffic between Pods needs it"
  HOST_IP=$(cp_file host.ip)
  [ -n "$HOST_IP" ] || die "the control plane listens on loopback only, where Pods cannot reach it: start it with MESH_CP_NODE=1"
  curl -sf --max-time 5 --cacert "$CP_STATE/pki/ca.crt" --cert "$CP_STATE/pki/admin.crt" --key "$CP_STATE/pki/admin.key" \
    "https://$HOST_IP:$(cp_file apiserver.port)/readyz" >/dev/null || die "the control plane is not ready on https://$HOST_IP:$(cp_file apiserver.port)"
}

# --- what start changes outside $STATE, recorded so stop can undo it -----------------------------------------

SYSCTLS="vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys
  kernel/keys/root_maxbytes net/ipv4/ip_forward net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables
  net/bridge/bridge-nf-call-ip6tables net/netfilter/nf_conntrack_tcp_timeout_established
  net/netfilter/nf_conntrack_tcp_timeout_close_wait"
OUTSIDE_PATHS="/var/lib/kubelet /var/log/containers /var/log/pods /run/containerd /opt/containerd /var/lib/cni /etc/cni
  /run/netns"

record_machine() {
  mkdir -p "$STATE/undo"
  for s in $SYSCTLS; do
    [ -e "/proc/sys/$s" ] && echo "$s $(cat "/proc/sys/$s")"
  done >"$STATE/undo/sysctls"
  for p in $OUTSIDE_PATHS /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do [ -e "$p" ] && echo "$p"; done >"$STATE/undo/paths"
  ls /run/netns 2>/dev/null >"$STATE/undo/netns" || true
  ip link show mesh0 >/dev/null 2>&1 && echo mesh0 >>"$STATE/undo/paths"
  nft list tables 2>/dev/null >"$STATE/undo/nft-tables" || true
  iptables-save >"$STATE/undo/iptables"
  ip6tables-save >"$STATE/undo/ip6tables" 2>/dev/null || true
}

existed() { grep -qxF "$1" "$STATE/undo/paths"; }

# Best effort, every step: one that fails must not keep the others from undoing their part.
restore_machine() {
  [ -d "$STATE/undo" ] || return 0
  # Tables the kubelet and kube-proxy created go whole; the ones that were there get their rules back (rules
  # others added to those tables meanwhile are lost with them).
  local table
  while read -r table; do
    # shellcheck disable=SC2086 # "table ip nat" is three words for nft
    grep -qxF "$table" "$STATE/undo/nft-tables" || nft delete $table || note "could not delete nft $table"
  done < <(nft list tables 2>/dev/null || true)
  iptables-restore <"$STATE/undo/iptables" || note "could not restore iptables (saved in $STATE/undo/iptables)"
  if [ -s "$STATE/undo/ip6tables" ]; then ip6tables-restore <"$STATE/undo/ip6tables" || note "could not restore ip6tables"; fi
  local netns
  for netns in $(ls /run/netns 2>/dev/null || true); do
    grep -qxF "$netns" "$STATE/undo/netns" && continue
    umount "/run/netns/$netns" 2>/dev/null || true
    rm -f "/run/netns/$netns" || note "could not remove /run/netns/$netns"
  done
  existed mesh0 || ip link del mesh0 2>/dev/null || true
  remove_cgroups
  local p
  for p in $OUTSIDE_PATHS; do
    existed "$p" || rm -rf "$p" || note "could not remove $p"
  done
  local s v
  while read -r s v; do echo "$v" >"/proc/sys/$s" 2>/dev/null || note "could not restore $s to $v"; done <"$STATE/undo/sysctls"
  rm -rf "$STATE/undo"
}

# The kubelet's Pod cgroups (kubepods) in every hierarchy, deepest first; runc removes the containers' own.
remove_cgroups() {
  local root
  for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$root" ] && ! existed "$root" || continue
    find "$root" -depth -type d -exec rmdir {} \; 2>/dev/null || note "could not remove every cgroup under $root"
  done
}

# --- certificates and configuration -------------------------------------------------------------------------

# A client certificate for `CN` in group `O`, signed by the control plane's CA, and a kubeconfig using it.
client_identity() {
  local name=$1 cn=$2 org=$3 pki=$STATE/pki
  openssl req -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -out "$pki/$name.csr" -subj "/O=$org/CN=$cn" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$CP_STATE/pki/ca.crt" -CAkey "$CP_STATE/pki/ca.key" -CAcreateserial \
    -out "$pki/$name.crt" -days 30 -extfile <(echo "extendedKeyUsage=clientAuth") 2>/dev/null
  cat >"$STATE/$name.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://$HOST_IP:$(cp_file apiserver.port)", certificate-authority: "$CP_STATE/pki/ca.crt"}}]
users: [{name: $name, user: {client-certificate: "$pki/$name.crt", client-key: "$pki/$name.key"}}]
contexts: [{name: local, context: {cluster: local, user: $name}}]
current-context: local
KC
}

gen_node_pki() {
  local pki=$STATE/pki
  mkdir -p "$pki"
  client_identity kubelet "system:node:$NODE_NAME" system:nodes
  client_identity controller-manager system:kube-controller-manager system:kube-controller-manager
  client_identity scheduler system:kube-scheduler system:kube-scheduler
  client_identity proxy system:kube-proxy system:node-proxier
  # The kubelet's serving certificate, which kube-apiserver verifies (kubectl logs/exec).
  openssl req -newkey rsa:2048 -nodes -keyout "$pki/kubelet-serving.key" -out "$pki/kubelet-serving.csr" \
    -subj "/O=system:nodes/CN=system:node:$NODE_NAME" 2>/dev/null
  openssl x509 -req -in "$pki/kubelet-serving.csr" -CA "$CP_STATE/pki/ca.crt" -CAkey "$CP_STATE/pki/ca.key" -CAcreateserial \
    -out "$pki/kubelet-serving.crt" -days 30 \
    -extfile <(printf 'subjectAltName=IP:%s,DNS:%s\nextendedKeyUsage=serverAuth\n' "$HOST_IP" "$NODE_NAME") 2>/dev/null
}

write_configs() {
  local bin=$1
  mkdir -p "$STATE/cni/net.d" "$STATE/containerd" "$STATE/kubelet" "$STATE/logs"
  cat >"$STATE/cni/net.d/10-mesh.conflist" <<CNI
{"cniVersion": "1.0.0", "name": "mesh", "plugins": [{"type": "bridge", "bridge": "mesh0", "isGateway": true,
 "ipMasq": false, "hairpinMode": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$STATE/cni/ipam"}}]}
CNI
  cat >"$STATE/containerd/config.toml" <<TOML
version = 3
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
[grpc]
  address = "$STATE/containerd.sock"
[ttrpc]
  address = "$STATE/containerd.sock.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "$STATE/containerd/opt"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "mesh.local/pause:dev"
[plugins.'io.containerd.cri.v1.runtime']
  # This machine's root may not lower an OOM score (no CAP_SYS_RESOURCE): without this every sandbox fails.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$bin/cni"]
    conf_dir = "$STATE/cni/net.d"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "$(command -v runc)"
      Root = "$STATE/runc"
      SystemdCgroup = false
TOML
  cat >"$STATE/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$CP_STATE/pki/ca.crt"}
authorization: {mode: Webhook}
address: "$HOST_IP"
port: $(free_port)
readOnlyPort: 0
healthzPort: 0
tlsCertFile: "$STATE/pki/kubelet-serving.crt"
tlsPrivateKeyFile: "$STATE/pki/kubelet-serving.key"
containerRuntimeEndpoint: "unix://$STATE/containerd.sock"
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
podLogsDir: "$STATE/pod-logs"
resolvConf: ""
# Images come from archives, not a registry: the kubelet must never collect them, whatever the disk holds.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
# Only Pods that ask for this node land on it: the API-only tests leave Pods behind that must stay Pending.
registerWithTaints: [{key: $NODE_TAINT, effect: NoSchedule}]
YAML
  cat >"$STATE/proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$STATE/proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
conntrack: {maxPerCore: 0}
iptables: {localhostNodePorts: false}
healthzBindAddress: "127.0.0.1:$(free_port)"
metricsBindAddress: "127.0.0.1:$(free_port)"
YAML
}

# --- start / stop -------------------------------------------------------------------------------------------

launch() { # name binary args...
  local name=$1; shift
  "$@" </dev/null >>"$STATE/logs/$name.log" 2>&1 8>&- &
  echo $! >"$STATE/$name.pid"
}

# The PID in $STATE/NAME.pid if that process is alive and still the binary we started (PIDs get reused).
pid_of() {
  local pid; pid=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "^$BIN/$2 " && echo "$pid"
}

alive() { pid_of "$1" "$(binary_of "$1")" >/dev/null; }

binary_of() { case "$1" in controller-manager | scheduler) echo "kube-$1" ;; *) echo "$1" ;; esac; }

wait_until() { # what seconds command...
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    for d in containerd kubelet kube-proxy controller-manager scheduler; do
      [ -f "$STATE/$d.pid" ] && ! alive "$d" && { tail -20 "$STATE/logs/$d.log" >&2; cmd_stop; die "$d exited while waiting for $what (its log is above; all: $STATE.last-logs)"; }
    done
    [ "$SECONDS" -lt "$deadline" ] || { cmd_stop; die "$what not within ${seconds}s (logs: $STATE.last-logs)"; }
    sleep 0.2
  done
}

kubectl_cp() { "$CP_BIN/kubectl" --kubeconfig "$CP_STATE/kubeconfig" "$@"; }
ctr_node() { "$BIN/ctr" --address "$STATE/containerd.sock" -n k8s.io "$@"; }

node_ready() {
  [ "$(kubectl_cp get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

cmd_start() {
  check_prerequisites
  BIN=$(cmd_build); CP_BIN=$("$ROOT/hack/control-plane.sh" bin)
  if alive containerd || alive kubelet; then die "a node from $STATE is already running; run '$0 stop' first"; fi
  # A start that failed halfway left its record of the machine: undo with it first, never record over it.
  [ -d "$STATE/undo" ] && { note "undoing what an earlier start left"; cmd_stop; set -e; }
  local started=$SECONDS
  rm -rf "$STATE"; mkdir -p "$STATE"
  echo "$BIN" >"$STATE/bin"; echo "$CP_BIN" >"$STATE/cp-bin"
  record_machine
  gen_node_pki
  write_configs "$BIN"
  echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
  echo 1 >/proc/sys/net/ipv4/ip_forward
  PATH="$BIN:$PATH" launch containerd "$BIN/containerd" --config "$STATE/containerd/config.toml"
  wait_until "containerd" 30 ctr_node version
  local image
  for image in "$ROOT"/_output/images/*.tar; do
    [ -f "$image" ] && cmd_import "$image"
  done
  launch controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --leader-elect=false --use-service-account-credentials --service-account-private-key-file "$CP_STATE/pki/sa.key" \
    --root-ca-file "$CP_STATE/pki/ca.crt" --secure-port 0 --controllers '*,-service-lb-controller,-cloud-node-lifecycle-controller'
  launch scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/scheduler.kubeconfig" --leader-elect=false --secure-port 0
  launch kube-proxy "$BIN/kube-proxy" --config "$STATE/proxy.yaml"
  launch kubelet "$BIN/kubelet" --config "$STATE/kubelet/config.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
    --root-dir "$STATE/kubelet/root" --cert-dir "$STATE/pki" --hostname-override "$NODE_NAME" --node-ip "$HOST_IP"
  # kube-apiserver's client to the kubelet (kubectl logs/exec), authorized by the kubelet's webhook.
  kubectl_cp create clusterrolebinding mesh-node:kubelet-api-admin --clusterrole system:kubelet-api-admin \
    --user kube-apiserver-kubelet-client >/dev/null 2>&1 || true
  wait_until "Node $NODE_NAME Ready" 120 node_ready
  note "node $NODE_NAME Ready in $((SECONDS - started))s (logs: $STATE/logs)"
}

cmd_import() {
  BIN=${BIN:-$(cat "$STATE/bin" 2>/dev/null || true)}
  alive containerd || die "no node running from $STATE: run '$0 start' first"
  local archive name
  for archive in "$@"; do
    name=$(python3 -c 'import json, sys, tarfile
index = json.load(tarfile.open(sys.argv[1]).extractfile("index.json"))
print(index["manifests"][0]["annotations"]["io.containerd.image.name"])' "$archive") ||
      die "$archive is not an image archive of hack/image.py (no io.containerd.image.name in its index.json)"
    ctr_node images import "$archive" >/dev/null 2>>"$STATE/logs/ctr.log" || die "importing $archive failed (log: $STATE/logs/ctr.log)"
    # Pinned: the kubelet's image garbage collection must never remove what no registry can bring back.
    ctr_node images label "$name" io.cri-containerd.pinned=pinned >/dev/null 2>>"$STATE/logs/ctr.log"
    note "imported $name"
  done
}

stop_daemon() { # name
  local pid
  if pid=$(pid_of "$1" "$(binary_of "$1")"); then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/$1.pid"
}

# The containers' shims outlive containerd by design: find ours by the socket they were started with, kill
# them and what they run, and wait until they are gone (their cgroups cannot be removed before).
kill_shims() {
  local pids pid
  pids=$(pgrep -f "containerd-shim-runc-v2 .*-address $STATE/containerd.sock" || true)
  for pid in $pids; do
    pkill -9 -P "$pid" 2>/dev/null || true
    kill -9 "$pid" 2>/dev/null || true
  done
  for pid in $pids; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

# Undoes start, best effort at every step (also after a start that failed halfway); keeps the logs.
cmd_stop() {
  set +e
  [ -d "$STATE" ] || { note "no node state in $STATE"; return 0; }
  BIN=$(cat "$STATE/bin" 2>/dev/null); CP_BIN=$(cat "$STATE/cp-bin" 2>/dev/null)
  stop_daemon kubelet
  if alive containerd; then
    local task
    for task in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks kill -s SIGKILL "$task" >/dev/null 2>&1; done
    for task in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks rm -f "$task" >/dev/null 2>&1; done
  fi
  for d in kube-proxy scheduler controller-manager containerd; do stop_daemon "$d"; done
  kill_shims
  local m
  for m in $(findmnt -rn -o TARGET | grep "^$STATE/" | sort -r); do umount "$m" 2>/dev/null || umount -l "$m"; done
  restore_machine
  if [ -x "$CP_BIN/kubectl" ]; then
    kubectl_cp delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null 2>&1
    kubectl_cp delete clusterrolebinding mesh-node:kubelet-api-admin --ignore-not-found >/dev/null 2>&1
  fi
  rm -rf "$STATE.last-logs"
  mv "$STATE/logs" "$STATE.last-logs" 2>/dev/null
  rm -rf "$STATE"
  note "stopped; the machine is as before start (logs: $STATE.last-logs)"
  return 0
}

cmd_status() {
  BIN=$(cat "$STATE/bin" 2>/dev/null || true)
  local any=0 d
  for d in containerd kubelet kube-proxy controller-manager scheduler; do
    alive "$d" && { echo "$d pid $(cat "$STATE/$d.pid")"; any=1; }
  done
  [ $any = 1 ] || echo "no node running from $STATE"
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  import) shift; cmd_import "$@" ;;
  *) echo "usage: $0 build|start|stop|status|import IMAGE.tar..." >&2; exit 2 ;;
esac
