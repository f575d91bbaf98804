//! Helpers the controller tests share: policies, assignments, conditions, one namespace per test.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use mesh_operator::api::MeshPolicy;
use mesh_operator::assignment::Assignment;
use serde_json::{Value, json};

use super::*;

pub const WAIT: Duration = Duration::from_secs(60);

pub fn spec(rv: &Rendezvous, extra: Value) -> Value {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": "agent"}},
        "maxPeers": 4,
        "heartbeatTimeout": "5s",
        "rendezvous": {"url": rv.url(), "pollInterval": "1s", "timeout": "1s"},
    });
    merge(&mut spec, extra);
    spec
}

pub fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

pub async fn create_policy(client: &Client, ns: &str, name: &str, spec: Value) {
    let mp: MeshPolicy = serde_json::from_value(json!({
        "apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": name}, "spec": spec}))
    .unwrap();
    Api::<MeshPolicy>::namespaced(client.clone(), ns).create(&PostParams::default(), &mp).await.unwrap();
}

pub async fn policy(client: &Client, ns: &str, name: &str) -> MeshPolicy {
    Api::<MeshPolicy>::namespaced(client.clone(), ns).get(name).await.unwrap()
}

pub fn condition(p: &MeshPolicy, type_: &str) -> Option<(String, String, String)> {
    let c = p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub async fn assignments(client: &Client, ns: &str) -> BTreeMap<String, Option<Assignment>> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns).list(&Default::default()).await.unwrap();
    pods.items.iter().map(|p| (p.name_any(), Assignment::from_annotations(p.annotations()))).collect()
}

pub fn pod_ids(ids: &[String]) -> HashMap<String, String> {
    ids.iter().enumerate().map(|(i, id)| (format!("agent-{i}"), id.clone())).collect()
}

pub async fn wait_assigned(client: &Client, ns: &str, pods: usize) -> BTreeMap<String, Option<Assignment>> {
    wait_for(&format!("{pods} Pods to carry an assignment"), WAIT, || async {
        let a = assignments(client, ns).await;
        (a.values().filter(|v| v.is_some()).count() == pods).then_some(a)
    })
    .await
}

pub async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> MeshPolicy {
    wait_for(&format!("{type_}={status} ({reason}) on MeshPolicy {name}"), WAIT, || async {
        let p = policy(client, ns, name).await;
        let c = condition(&p, type_)?;
        (c.0 == status && c.1 == reason).then_some(p)
    })
    .await
}

pub async fn setup(hint: &str) -> (Client, String, Rendezvous) {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, hint).await;
    (client, ns, Rendezvous::start().await)
}
