//! Test fixtures shared by the pure steps' tests: a policy, agent Pods as the cache keeps them, presence.
use std::sync::Arc;

use serde_json::json;

use super::pods::CachedPod;
use super::policy::ValidPolicy;
use crate::api::MeshPolicy;
use crate::assignment::Assignment;
use crate::presence::{Node, Snapshot};

pub const NOW_MS: f64 = 1.0e12;

/// Policy `mesh` in namespace `ci`, selecting `app=agent`, with cap `max_peers`.
pub fn policy(max_peers: u32) -> ValidPolicy {
    let spec = json!({"selector": {"matchLabels": {"app": "agent"}}, "rendezvous": {"url": "http://rv"}, "maxPeers": max_peers});
    let mut p = MeshPolicy::new("mesh", serde_json::from_value(spec).unwrap());
    p.metadata.namespace = Some("ci".into());
    p.metadata.uid = Some("uid-mesh".into());
    ValidPolicy::new(&p).unwrap()
}

/// Ready agent Pod `agent-{i}` with IP 10.0.0.{i} and node id `n{i}`, carrying `carries` if any.
pub fn agent(i: usize, carries: Option<&Assignment>) -> Arc<CachedPod> {
    let mut annotations = json!({"agentmesh.dev/node-id": format!("n{i}")});
    for (k, v) in carries.map(Assignment::to_annotations).unwrap_or_default() {
        annotations[k] = json!(v);
    }
    let pod = json!({
        "metadata": {"name": format!("agent-{i}"), "namespace": "ci", "uid": format!("u{i}"),
                     "labels": {"app": "agent"}, "annotations": annotations},
        "status": {"podIP": format!("10.0.0.{i}"), "conditions": [{"type": "Ready", "status": "True"}]}
    });
    Arc::new(CachedPod::from_pod(serde_json::from_value(pod).unwrap()))
}

/// Presence listing agents `0..n`, all alive and just seen.
pub fn presence(n: usize) -> Snapshot {
    let node = |i: usize| Node {
        node_id: format!("n{i}").into(),
        address: "ws://0.0.0.0:3001/crdt-sync".into(),
        alive: true,
        last_seen_ms: Some(NOW_MS - 1_000.0),
        hostname: None,
        unreachable: Default::default(),
    };
    Snapshot { now_ms: Some(NOW_MS), nodes: std::sync::Arc::new((0..n).map(node).collect()), ..Default::default() }
}
