#!/usr/bin/env bash
# A real, local Kubernetes control plane (etcd + kube-apiserver) on loopback, built from pinned Go modules.
#
#   hack/control-plane.sh build    build kube-apiserver, kubectl, etcd and helm into the version-keyed cache
#   hack/control-plane.sh start    start etcd and kube-apiserver; print the KUBECONFIG export line
#   hack/control-plane.sh ensure   start unless one is already running and ready (used by the test harness)
#   hack/control-plane.sh stop     stop exactly what start started and remove its data
#   hack/control-plane.sh status   say what runs where
#   hack/control-plane.sh bin      print the directory holding the built binaries
#   hack/control-plane.sh restart apiserver|etcd   restart one daemon in place (same ports and data)
#   hack/control-plane.sh down|up apiserver|etcd   stop one daemon, or start it again (the two halves of restart)
#
# The daemons get no inherited descriptors (</dev/null, logs, lock fds closed): a caller reading our output,
# or waiting on our lock, must not wait for etcd or kube-apiserver to exit.
#
# Environment: MESH_CP_DIR (state directory, default ./_output/control-plane), MESH_CACHE_DIR (binary cache,
# default ~/.cache/mesh-operator), APISERVER_PORT and ETCD_PORT (default: free ports picked at start),
# MESH_CP_READY_TIMEOUT (seconds, default 60), MESH_K8S_VERSION (another Kubernetes release than the pinned one,
# e.g. v1.33.13: `make test-kube-version` runs the control-plane suite against it), MESH_CP_NODE=1 (also listen
# on this machine's address, so the Pods of hack/node.sh reach the API server).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/hack/tools"
STATE=${MESH_CP_DIR:-$ROOT/_output/control-plane}
READY_TIMEOUT=${MESH_CP_READY_TIMEOUT:-60}

SELF=control-plane
# shellcheck source=hack/lib.sh
. "$ROOT/hack/lib.sh"

cmd_build() {
  local bin; bin=$(cache_dir)
  lock_cache "$bin"
  local stamp; stamp=$(k8s_stamp)
  local k8s; k8s=$(k8s_module)
  build_one "$k8s" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$bin" "$stamp"
  build_one "$k8s" kubectl k8s.io/kubernetes/cmd/kubectl "$bin" "$stamp"
  build_one etcd etcd go.etcd.io/etcd/server/v3 "$bin"
  build_one helm helm helm.sh/helm/v3/cmd/helm "$bin"
  flock -u 8
  echo "$bin"
}

# This machine's address on its default route (empty without one): where Pods reach the API server.
host_ip() {
  ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "src") {print $(i + 1); exit}}'
}

port_in_use() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
PY
}

# Prints the PID in $1 if that process is alive and runs the binary we started; a stale file is removed.
live_pid() {
  local file=$1 name=$2 pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$name"; then
    echo "$pid"
    return 0
  fi
  note "removing stale PID file $file (process ${pid:-?} is gone)"
  rm -f "$file"
  return 1
}

gen_certs() {
  local d=$STATE/pki
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=mesh-operator-local-ca" 2>/dev/null
    cat >serving.ext <<EOF
subjectAltName=IP:127.0.0.1,IP:10.0.0.1${HOST_IP:+,IP:$HOST_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EOF
    openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out serving.crt -days 30 -extfile serving.ext 2>/dev/null
    echo "extendedKeyUsage=clientAuth" >client.ext
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 30 -extfile client.ext 2>/dev/null
    # What kube-apiserver shows kubelets (kubectl logs/exec); hack/node.sh grants it system:kubelet-api-admin.
    openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr \
      -subj "/CN=kube-apiserver-kubelet-client" 2>/dev/null
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kubelet-client.crt -days 30 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() {
  local port=$1 d=$STATE/pki
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 "$d/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$d/admin.crt")
    client-key-data: $(base64 -w0 "$d/admin.key")
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
EOF
}

is_ready() {
  local port; port=$(cat "$STATE/apiserver.port" 2>/dev/null) || return 1
  curl -sf --max-time 2 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
    "https://127.0.0.1:$port/readyz" >/dev/null 2>&1
}

# Starts etcd on the ports recorded in $STATE (its data stays across restarts).
launch_etcd() {
  local bin=$1 etcd_port peer_port
  etcd_port=$(cat "$STATE/etcd.port"); peer_port=$(cat "$STATE/etcd.peer-port")
  "$bin/etcd" --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "local=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn \
    </dev/null >>"$STATE/etcd.log" 2>&1 8>&- 9>&- &
  echo $! >"$STATE/etcd.pid"
}

# Starts kube-apiserver on the port recorded in $STATE.
launch_apiserver() {
  local bin=$1 pki=$STATE/pki api_port etcd_port
  api_port=$(cat "$STATE/apiserver.port"); etcd_port=$(cat "$STATE/etcd.port")
  HOST_IP=$(cat "$STATE/host.ip")
  # With MESH_CP_NODE=1 the API server also listens on this machine's address, where hack/node.sh's Pods
  # reach it as the `kubernetes` Service's endpoint; otherwise it stays on loopback.
  local bind=127.0.0.1 reconciler=none
  [ -n "$HOST_IP" ] && bind=0.0.0.0 reconciler=lease
  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$bind" --advertise-address "${HOST_IP:-127.0.0.1}" --secure-port "$api_port" \
    --endpoint-reconciler-type "$reconciler" --anonymous-auth=false \
    --kubelet-client-certificate "$pki/kubelet-client.crt" --kubelet-client-key "$pki/kubelet-client.key" \
    --kubelet-certificate-authority "$pki/ca.crt" --kubelet-preferred-address-types InternalIP,Hostname \
    --enable-admission-plugins NodeRestriction \
    --tls-cert-file "$pki/serving.crt" --tls-private-key-file "$pki/serving.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode Node,RBAC \
    --etcd-compaction-interval "${MESH_CP_COMPACTION_INTERVAL:-5m}" \
    </dev/null >>"$STATE/apiserver.log" 2>&1 8>&- 9>&- &
  echo $! >"$STATE/apiserver.pid"
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT))
  until is_ready; do
    [ "$SECONDS" -lt "$deadline" ] || { tail -30 "$STATE/apiserver.log" >&2; die "not ready within ${READY_TIMEOUT}s"; }
    sleep 0.2
  done
}

# Stops one daemon of a running control plane, keeping its ports and data (`up` starts it again): the fault
# tests use it to change etcd behind the API server's back, and `restart` is both.
cmd_down() {
  case "$1" in
    apiserver) stop_pid "$STATE/apiserver.pid" kube-apiserver ;;
    etcd) stop_pid "$STATE/etcd.pid" etcd ;;
    *) die "down: apiserver or etcd, not '$1'" ;;
  esac
  note "stopped $1"
}

cmd_up() {
  local bin; bin=$(cmd_build)
  case "$1" in
    apiserver) launch_apiserver "$bin" ;;
    etcd) launch_etcd "$bin" ;;
    *) die "up: apiserver or etcd, not '$1'" ;;
  esac
  wait_ready
  note "started $1"
}

cmd_start() {
  if live_pid "$STATE/apiserver.pid" kube-apiserver >/dev/null || live_pid "$STATE/etcd.pid" etcd >/dev/null; then
    die "a control plane from $STATE is already running; run '$0 stop' first (or '$0 status')"
  fi
  local bin; bin=$(cmd_build)
  local started=$SECONDS
  rm -rf "$STATE"
  mkdir -p "$STATE"
  local etcd_port=${ETCD_PORT:-$(free_port)} peer_port api_port=${APISERVER_PORT:-$(free_port)}
  peer_port=$(free_port)
  for p in "$etcd_port" "$api_port"; do
    port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (set ETCD_PORT / APISERVER_PORT to another)"
  done
  HOST_IP=
  [ "${MESH_CP_NODE:-}" = 1 ] && { HOST_IP=$(host_ip); [ -n "$HOST_IP" ] || die "MESH_CP_NODE=1 needs a default route"; }
  echo "$HOST_IP" >"$STATE/host.ip"
  k8s_version >"$STATE/k8s.version"
  gen_certs

  echo "$api_port" >"$STATE/apiserver.port"
  echo "$etcd_port" >"$STATE/etcd.port"
  echo "$peer_port" >"$STATE/etcd.peer-port"
  launch_etcd "$bin"
  launch_apiserver "$bin"
  write_kubeconfig "$api_port"

  local deadline=$((SECONDS + READY_TIMEOUT))
  until is_ready; do
    if ! live_pid "$STATE/etcd.pid" etcd >/dev/null; then
      tail -20 "$STATE/etcd.log" >&2
      cmd_stop >/dev/null 2>&1 || true
      die "etcd exited during start-up (its log is above)"
    fi
    if ! live_pid "$STATE/apiserver.pid" kube-apiserver >/dev/null; then
      tail -30 "$STATE/apiserver.log" >&2
      cmd_stop >/dev/null 2>&1 || true
      die "kube-apiserver exited during start-up (its log is above)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -30 "$STATE/apiserver.log" >&2
      cmd_stop >/dev/null 2>&1 || true
      die "kube-apiserver was not ready (/readyz) within ${READY_TIMEOUT}s (the tail of its log is above)"
    fi
    sleep 0.2
  done
  note "ready on https://127.0.0.1:$api_port in $((SECONDS - started))s (etcd on 127.0.0.1:$etcd_port)"
  echo "export KUBECONFIG=$STATE/kubeconfig"
}

cmd_ensure() {
  mkdir -p "$(dirname "$STATE")"
  exec 9>"$STATE.lock"
  flock 9
  local node_mode=0; [ -s "$STATE/host.ip" ] && node_mode=1
  if live_pid "$STATE/apiserver.pid" kube-apiserver >/dev/null && is_ready &&
    [ "$(cat "$STATE/k8s.version" 2>/dev/null)" = "$(k8s_version)" ] && [ "$node_mode" = "${MESH_CP_NODE:-0}" ]; then
    echo "export KUBECONFIG=$STATE/kubeconfig"
  else
    cmd_stop >/dev/null 2>&1 || true
    cmd_start
  fi
}

stop_pid() {
  local file=$1 name=$2 pid
  pid=$(live_pid "$file" "$name") || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
  note "stopped $name (pid $pid)"
}

cmd_stop() {
  stop_pid "$STATE/apiserver.pid" kube-apiserver
  stop_pid "$STATE/etcd.pid" etcd
  rm -rf "$STATE"
}

cmd_status() {
  local any=0 pid
  if pid=$(live_pid "$STATE/etcd.pid" etcd 2>/dev/null); then
    echo "etcd            pid $pid  http://127.0.0.1:$(cat "$STATE/etcd.port")"; any=1
  fi
  if pid=$(live_pid "$STATE/apiserver.pid" kube-apiserver 2>/dev/null); then
    local ready=not-ready; is_ready && ready=ready
    echo "kube-apiserver  pid $pid  https://127.0.0.1:$(cat "$STATE/apiserver.port")  ($ready)"; any=1
    echo "export KUBECONFIG=$STATE/kubeconfig"
  fi
  [ "$any" = 1 ] || { echo "no control plane running from $STATE"; return 1; }
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start ;;
  ensure) cmd_ensure ;;
  restart) cmd_down "${2:-}"; cmd_up "${2:-}" ;;
  down) cmd_down "${2:-}" ;;
  up) cmd_up "${2:-}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  bin) cache_dir ;;
  *) echo "usage: $0 build|start|ensure|stop|status|bin|restart|down|up apiserver|etcd" >&2; exit 2 ;;
esac
