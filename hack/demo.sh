#!/usr/bin/env bash
# The local demo (`make demo`): a real control plane, the rendezvous hub, 30 real agents (mesh-agent processes)
# in 3 zones, the MeshPolicy CRD and a policy, and the operator. Then the rendezvous and 5 agents die: updates
# written during the outage reach every surviving agent over the mesh, and every agent stays within the cap.
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

say "Building mesh-operator, mesh-agent, rendezvous and kubectl-mesh"
cargo build --release --quiet --locked --workspace --bins
export PATH=$ROOT/target/release:$(hack/control-plane.sh bin):$PATH

say "Starting the local control plane (etcd + kube-apiserver)"
eval "$(hack/control-plane.sh start)"
rm -rf "$WORK" && mkdir -p "$WORK"

say "Starting the rendezvous (a real sync hub)"
rendezvous --listen 127.0.0.1:0 --identity "$WORK/rendezvous.key" >"$WORK/rendezvous.log" 2>"$WORK/rendezvous.err" &
pids+=($!)
hub_pid=$!
for _ in $(seq 50); do grep -q "listening on" "$WORK/rendezvous.log" && break; sleep 0.1; done
HUB=$(sed -n 's/^listening on \([^ ]*\) node=.*/\1/p' "$WORK/rendezvous.log")
HUB_ID=$(sed -n 's/^listening on [^ ]* node=//p' "$WORK/rendezvous.log")
echo "rendezvous at http://$HUB (presence) and wss://$HUB/crdt-sync (agent links, node ${HUB_ID:0:12}…)"

say "Starting $AGENTS real agents (mesh-agent) on 127.0.2.1-$AGENTS, and their Pods in 3 zones"
kubectl apply -f crds/meshpolicy.yaml >/dev/null
kubectl wait --for condition=Established crd/meshpolicies.agentmesh.dev --timeout=30s >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl create serviceaccount default -n "$NS" >/dev/null
agent_pid=()
for i in $(seq 0 $((AGENTS - 1))); do
  mesh-agent --listen "127.0.2.$((i + 1)):3001" --metrics "127.0.2.$((i + 1)):9464" \
    --test-api "127.0.2.$((i + 1)):9465" --hostname "agent-$i" \
    --identity "$WORK/agent-$i.key" --rendezvous "wss://$HUB/crdt-sync" --rendezvous-node-id "$HUB_ID" --max-peers 4 --heartbeat 2s \
    --assignment-file "$WORK/agent-$i.annotations" >"$WORK/agent-$i.out" 2>"$WORK/agent-$i.log" &
  pids+=($!)
  agent_pid[$i]=$!
  cat <<EOF
---
apiVersion: v1
kind: Pod
metadata:
  name: agent-$i
  labels: {app: build-agent, topology.kubernetes.io/zone: zone-$((i % 3))}
spec:
  containers: [{name: agent, image: "agent:dev"}]
EOF
done >"$WORK/pods.yaml"
kubectl apply -n "$NS" -f "$WORK/pods.yaml" >/dev/null
# There is no kubelet: set what it would (Running, Ready, a Pod IP) through the status subresource...
for i in $(seq 0 $((AGENTS - 1))); do
  kubectl patch pod "agent-$i" -n "$NS" --subresource=status --type=merge -p "{\"status\":{\"phase\":\"Running\",\
\"podIP\":\"127.0.2.$((i + 1))\",\"podIPs\":[{\"ip\":\"127.0.2.$((i + 1))\"}],\
\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"lastTransitionTime\":\"2026-01-01T00:00:00Z\"}]}}" >/dev/null
done
# ...and stand in for its downward-API volume: every second, each Pod's annotations go to its agent's file
# in the kubelet's format (key="Go-quoted value"), replaced atomically.
(
  while true; do
    kubectl get pods -n "$NS" -o go-template='{{range .items}}=== {{.metadata.name}}{{"\n"}}{{range $k, $v := .metadata.annotations}}{{$k}}={{printf "%q" $v}}{{"\n"}}{{end}}{{end}}' 2>/dev/null |
      awk -v dir="$WORK" '
        function flush() { if (f) { close(f); system("mv " f " " dir "/" name ".annotations") } }
        /^=== / { flush(); name = $2; f = dir "/" name ".tmp"; printf "" > f; next }
        { print >> f }
        END { flush() }'
    sleep 1
  done
) &
pids+=($!)

say "Creating the MeshPolicy"
kubectl apply -n "$NS" -f - <<EOF
apiVersion: agentmesh.dev/v1alpha1
kind: MeshPolicy
metadata: {name: build-agents}
spec:
  selector: {matchLabels: {app: build-agent}}
  maxPeers: 4
  topologyKey: topology.kubernetes.io/zone
  heartbeatTimeout: 30s
  rendezvous: {url: "http://$HUB", pollInterval: 2s, timeout: 1s}
EOF

say "Starting the operator"
mesh-operator run --leader-elect=false --metrics-addr 127.0.0.1:0 >"$WORK/operator.log" 2>&1 &
pids+=($!)

wait_for() { # description, command…
  local what=$1; shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for $what; operator log:" >&2; tail -20 "$WORK/operator.log" >&2; exit 1
}
status_is() { [ "$(kubectl get mp build-agents -n "$NS" -o jsonpath="$1")" = "$2" ]; }
# The agents' own view (each agent's /status and /updates): see hack/demo-agents.py.
agents() { python3 hack/demo-agents.py "$@"; }
wait_for "all $AGENTS agents assigned" status_is '{.status.assigned}' "$AGENTS"
wait_for "every agent to hold its planned links" agents --check-links $(seq 0 $((AGENTS - 1)))

say "kubectl get mp"
kubectl get mp -n "$NS"
say "kubectl mesh status build-agents"
kubectl mesh status build-agents -n "$NS"
say "Each agent's open links, as the agents report them (cap 4)"
agents --links $(seq 0 $((AGENTS - 1)))

say "Killing the rendezvous and 5 agents"
{ kill -9 "$hub_pid"; wait "$hub_pid"; } 2>/dev/null || true
for i in 0 1 2 3 4; do kill "${agent_pid[$i]}"; kubectl delete pod "agent-$i" -n "$NS" --wait=false >/dev/null; done
survivors=$(seq 5 $((AGENTS - 1)))
wait_for "the outage to be reported" status_is '{.status.conditions[?(@.type=="RendezvousReachable")].status}' False

say "Writing an update at agent-10 and one at agent-29 while the rendezvous is down"
for w in 10 29; do
  curl -sf -X POST "http://127.0.2.$((w + 1)):9465/updates" -H 'content-type: application/json' -d '{"value":"during the outage"}'
  echo
done
wait_for "both updates at every surviving agent" agents --check-updates 2 $survivors
agents --updates $survivors

say "The mesh holds: the survivors replanned from the last good presence, every agent within the cap"
wait_for "the 25 survivors to be replanned" status_is '{.status.assigned}' 25
wait_for "every survivor to hold its new planned links" agents --check-links $survivors
kubectl get mp -n "$NS"
kubectl get mp build-agents -n "$NS" \
  -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}){"\n"}{end}'
agents --links $survivors
say "Done: stopping the agents, the operator and the control plane"
