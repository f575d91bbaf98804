#!/usr/bin/env bash
# The local demo (`make demo`): a real control plane, the rendezvous simulator with 30 agents in 3 zones, the
# MeshPolicy CRD and a policy, and the operator. Then 5 agents and the rendezvous die, and the mesh holds.
# Everything it starts, it stops on the way out (also on Ctrl-C or failure).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export MESH_CP_DIR=$ROOT/_output/demo-control-plane
WORK=$ROOT/_output/demo
NS=demo
AGENTS=30

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  hack/control-plane.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "Building mesh-operator, rendezvous-sim and kubectl-mesh"
cargo build --release --quiet --bins
export PATH=$ROOT/target/release:$(hack/control-plane.sh bin):$PATH

say "Starting the local control plane (etcd + kube-apiserver)"
eval "$(hack/control-plane.sh start)"
rm -rf "$WORK" && mkdir -p "$WORK"

say "Starting the rendezvous simulator"
rendezvous-sim --listen 127.0.0.1:0 >"$WORK/rendezvous.log" 2>&1 &
pids+=($!)
sim_pid=$!
for _ in $(seq 50); do grep -q "listening on" "$WORK/rendezvous.log" && break; sleep 0.1; done
RV=http://$(sed -n 's/^listening on //p' "$WORK/rendezvous.log")
echo "rendezvous at $RV"

say "Installing the CRD, a namespace and $AGENTS agent Pods in 3 zones"
kubectl apply -f crds/meshpolicy.yaml >/dev/null
kubectl wait --for condition=Established crd/meshpolicies.agentmesh.dev --timeout=30s >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl create serviceaccount default -n "$NS" >/dev/null
for i in $(seq 0 $((AGENTS - 1))); do
  id=$(printf "agent-%d" "$i" | sha256sum | cut -c1-64)
  zone=zone-$((i % 3))
  cat <<EOF
---
apiVersion: v1
kind: Pod
metadata:
  name: agent-$i
  labels: {app: build-agent, topology.kubernetes.io/zone: $zone}
  annotations: {agentmesh.dev/node-id: "$id"}
spec:
  containers: [{name: agent, image: "agent:dev"}]
EOF
  curl -sf -X POST "$RV/admin/agents" -H 'content-type: application/json' \
    -d "{\"nodeId\":\"$id\",\"address\":\"ws://0.0.0.0:3001/crdt-sync\",\"hostname\":\"agent-$i\",\"zone\":\"$zone\"}"
done >"$WORK/pods.yaml"
kubectl apply -n "$NS" -f "$WORK/pods.yaml" >/dev/null
# There is no kubelet: set what it would (Running, Ready, a Pod IP) through the status subresource.
for i in $(seq 0 $((AGENTS - 1))); do
  kubectl patch pod "agent-$i" -n "$NS" --subresource=status --type=merge -p "{\"status\":{\"phase\":\"Running\",\
\"podIP\":\"127.0.2.$((i + 1))\",\"podIPs\":[{\"ip\":\"127.0.2.$((i + 1))\"}],\
\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"lastTransitionTime\":\"2026-01-01T00:00:00Z\"}]}}" >/dev/null
done

say "Creating the MeshPolicy"
kubectl apply -n "$NS" -f - <<EOF
apiVersion: agentmesh.dev/v1alpha1
kind: MeshPolicy
metadata: {name: build-agents}
spec:
  selector: {matchLabels: {app: build-agent}}
  maxPeers: 4
  topologyKey: topology.kubernetes.io/zone
  rendezvous: {url: "$RV", pollInterval: 2s, timeout: 1s}
EOF

say "Starting the operator"
mesh-operator run --leader-elect=false --metrics-addr 127.0.0.1:0 >"$WORK/operator.log" 2>&1 &
pids+=($!)

wait_for() { # description, command…
  local what=$1; shift
  for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for $what; operator log:" >&2; tail -20 "$WORK/operator.log" >&2; exit 1
}
status_is() { [ "$(kubectl get mp build-agents -n "$NS" -o jsonpath="$1")" = "$2" ]; }
wait_for "all $AGENTS agents assigned" status_is '{.status.assigned}' "$AGENTS"

say "kubectl get mp"
kubectl get mp -n "$NS"
say "kubectl mesh status build-agents"
kubectl mesh status build-agents -n "$NS"

say "Killing 5 agents and the rendezvous"
for i in 0 1 2 3 4; do kubectl delete pod "agent-$i" -n "$NS" --wait=false >/dev/null; done
kill "$sim_pid"
wait "$sim_pid" 2>/dev/null || true
wait_for "the outage to be reported" status_is '{.status.conditions[?(@.type=="RendezvousReachable")].status}' False
wait_for "the 25 survivors to be replanned" status_is '{.status.assigned}' 25

say "The mesh holds: 25 agents, one component, every agent within the cap"
kubectl get mp -n "$NS"
kubectl get mp build-agents -n "$NS" \
  -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}){"\n"}{end}'
kubectl mesh status build-agents -n "$NS"
say "Done: stopping the operator and the control plane"
