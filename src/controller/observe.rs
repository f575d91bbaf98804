//! Observe: what the caches say about one policy's namespace, as the later steps read it. Each Pod is
//! filed on its own ([`Observed::file`]), so a view can be kept up to date one changed Pod at a time (see
//! [`super::fleet`]); [`observe`] files a whole namespace at once. Pure, unit-tested without a cluster.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use super::Context;
use super::pods::CachedPod;
use super::pods::{self, PodState};
use super::policy::ValidPolicy;
use crate::api::MeshPolicy;
use crate::assignment::{Assignment, Name};

/// What the caches say about one policy's namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Pods the policy selects and owns (no older policy selects them).
    pub selected: BTreeMap<Name, Arc<CachedPod>>,
    /// Pods it selects that an older policy owns.
    pub conflicted: BTreeSet<Name>,
    /// Every Pod of the namespace that is selected or carries any `agentmesh.dev/*` key.
    pub pods: BTreeMap<Name, PodState>,
    /// What each Pod carries as this policy's.
    pub carried: BTreeMap<Name, Arc<Assignment>>,
    /// Pods carrying another policy's assignment, and the node ids those link.
    pub foreign: Foreign,
    /// Every cached Pod of the namespace (for the IPs of those not terminating, read only without presence).
    pub namespace_pods: BTreeMap<Name, Arc<CachedPod>>,
}

/// Pods carrying another policy's assignment (Pod → that policy), and the node ids they dial or accept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Foreign {
    pods: BTreeMap<String, (String, Vec<String>)>,
    /// Node id → the foreign Pods linking it.
    ids: BTreeMap<String, BTreeSet<String>>,
}

impl Foreign {
    /// The policy whose assignment Pod `pod` carries, if another's.
    pub fn pod(&self, pod: &str) -> Option<&str> {
        self.pods.get(pod).map(|(owner, _)| owner.as_str())
    }

    /// The policy whose Pods link node id `id` (of several, the one whose Pod sorts first).
    pub fn id(&self, id: &str) -> Option<&str> {
        self.pod(self.ids.get(id)?.first()?)
    }

    pub fn insert(&mut self, pod: &str, owner: &str, ids: Vec<String>) {
        for id in &ids {
            self.ids.entry(id.clone()).or_default().insert(pod.to_owned());
        }
        self.pods.insert(pod.to_owned(), (owner.to_owned(), ids));
    }

    /// Forgets Pod `pod`; the node ids it linked.
    fn remove(&mut self, pod: &str) -> Vec<String> {
        let Some((_, ids)) = self.pods.remove(pod) else { return Vec::new() };
        for id in &ids {
            if let Some(linking) = self.ids.get_mut(id) {
                linking.remove(pod);
                if linking.is_empty() {
                    self.ids.remove(id);
                }
            }
        }
        ids
    }
}

/// What filing a Pod depends on besides the Pod: the policy, and its namespace's other policies.
pub struct Filing<'a> {
    policy: &'a ValidPolicy,
    older: Vec<Selector>,
    existing: HashSet<String>,
}

impl<'a> Filing<'a> {
    pub fn new(policy: &'a ValidPolicy, policies: &[Arc<MeshPolicy>]) -> Self {
        let existing =
            policies.iter().filter(|p| p.uid().as_deref() != Some(&policy.uid)).map(|p| p.name_any()).collect();
        Self { policy, older: policy.older_selectors(policies), existing }
    }

    /// Every Pod of `pods` filed.
    pub fn observe(&self, pods: &[Arc<CachedPod>]) -> Observed {
        let mut o = Observed::default();
        for pod in pods {
            o.file(self, pod);
        }
        o
    }
}

/// Reads the Pod and policy caches of the policy's namespace.
pub fn gather(ctx: &Context, policy: &ValidPolicy) -> Observed {
    let pods = ctx.pods.namespace(&policy.namespace);
    observe(policy, &pods, &namespace_policies(ctx, &policy.namespace))
}

/// The policies of namespace `ns`, from the cache.
pub fn namespace_policies(ctx: &Context, ns: &str) -> Vec<Arc<MeshPolicy>> {
    ctx.policies.state().into_iter().filter(|p| p.namespace().as_deref() == Some(ns)).collect()
}

/// What `pods` and `policies` (of `policy`'s namespace) say about `policy`. Pure.
pub fn observe(policy: &ValidPolicy, pods: &[Arc<CachedPod>], policies: &[Arc<MeshPolicy>]) -> Observed {
    Filing::new(policy, policies).observe(pods)
}

impl Observed {
    /// Files `pod` where the ownership rules put it; the node ids it makes another policy's. Any earlier
    /// filing of a Pod of that name must be undone first ([`Observed::unfile`]).
    pub fn file(&mut self, f: &Filing, pod: &Arc<CachedPod>) -> Vec<String> {
        let (policy, name) = (f.policy, pod.name.clone());
        self.namespace_pods.insert(name.clone(), pod.clone());
        let selected = policy.selects(pod.labels());
        if selected {
            match f.older.iter().any(|s| s.matches(pod.labels())) {
                true => _ = self.conflicted.insert(name.clone()),
                false => _ = self.selected.insert(name.clone(), pod.clone()),
            }
        }
        let mut state = pod_state(pod, &policy.node_id_annotation);
        // Keys naming a policy that does not exist (any more) are strays, not another policy's Pod.
        if state.keys.policy().is_some_and(|p| p != policy.name && !f.existing.contains(p)) {
            state.keys = state.keys.without_policy();
        }
        if let Some(owner) = state.keys.policy().filter(|owner| *owner != policy.name) {
            let theirs = state.keys.lenient().unwrap_or_default();
            let ids: Vec<String> = theirs.linked_ids().into_iter().map(str::to_owned).collect();
            self.foreign.insert(&name, owner, ids.clone());
            return ids;
        }
        if let Some(a) = state.carried(&policy.name, selected) {
            self.carried.insert(name.clone(), a);
        }
        if selected || !state.keys.is_empty() {
            self.pods.insert(name, state);
        }
        Vec::new()
    }

    /// Undoes the filing of Pod `name`; the node ids it made another policy's.
    pub fn unfile(&mut self, name: &str) -> Vec<String> {
        self.namespace_pods.remove(name);
        self.selected.remove(name);
        self.conflicted.remove(name);
        self.pods.remove(name);
        self.carried.remove(name);
        self.foreign.remove(name)
    }
}

/// The Pods of `policy`'s namespace whose keys name it, without reading its spec: for a policy deleted
/// with a spec the controller refuses.
pub fn naming(ctx: &Context, policy: &MeshPolicy) -> Observed {
    let (name, ns) = (policy.name_any(), policy.namespace().unwrap_or_default());
    let mut o = Observed::default();
    for pod in ctx.pods.namespace(&ns).iter().filter(|p| p.keys.policy() == Some(name.as_str())) {
        let state = pod_state(pod, crate::assignment::NODE_ID);
        o.carried.extend(state.carried(&name, false).map(|a| (pod.name.clone(), a)));
        o.pods.insert(pod.name.clone(), state);
    }
    o
}

fn pod_state(pod: &CachedPod, node_id_annotation: &str) -> PodState {
    PodState {
        uid: pods::nonempty(&pod.uid),
        resource_version: pods::nonempty(&pod.resource_version),
        node_id: pod.annotation(node_id_annotation).cloned(),
        keys: pod.keys.clone(),
    }
}

/// Whether the Pod cache shows every write this process made in `ns`: a decision on an older cache could
/// undo a write it does not see.
pub fn caught_up(ctx: &Context, ns: &str) -> bool {
    ctx.expectations.caught_up(ns, &|pod| {
        let cached = ctx.pods.get(ns, pod)?;
        let owned = |s: &Arc<str>| pods::nonempty(s).map(|s| s.to_string());
        Some((owned(&cached.uid), owned(&cached.resource_version)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, uid: &str, created: i64, labels: serde_json::Value) -> Arc<MeshPolicy> {
        let spec = json!({"selector": {"matchLabels": labels}, "rendezvous": {"url": "http://rv"}});
        let mut p = MeshPolicy::new(name, serde_json::from_value(spec).unwrap());
        p.metadata.namespace = Some("ci".into());
        p.metadata.uid = Some(uid.into());
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        Arc::new(p)
    }

    fn pod(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Arc<CachedPod> {
        let pod = json!({"metadata": {"name": name, "namespace": "ci", "labels": labels, "annotations": annotations}});
        Arc::new(CachedPod::from_pod(serde_json::from_value(pod).unwrap()))
    }

    fn carrying(policy: &str, peer: &str) -> serde_json::Value {
        json!({"agentmesh.dev/peers": format!(r#"[{{"nodeId":"{peer}","url":"ws://10.0.0.9:1/x"}}]"#),
               "agentmesh.dev/accepts": "[]", "agentmesh.dev/links": "1", "agentmesh.dev/policy": policy})
    }

    /// Each row: a Pod (labels, annotations) → where `mesh` (selecting app=agent, younger than `old`,
    /// which selects tier=old) files it.
    #[test]
    fn each_pod_lands_where_the_ownership_rules_say() {
        let old = policy("old", "u-old", 10, json!({"tier": "old"}));
        let mesh = policy("mesh", "u-mesh", 20, json!({"app": "agent"}));
        let valid = ValidPolicy::new(&mesh).unwrap();
        let rows: [(&str, serde_json::Value, serde_json::Value, &str); 6] = [
            ("plain", json!({"app": "agent"}), json!({}), "selected"),
            ("both", json!({"app": "agent", "tier": "old"}), json!({}), "conflicted"),
            ("mine", json!({"app": "agent"}), carrying("mesh", "n9"), "selected+carried"),
            ("theirs", json!({"tier": "old"}), carrying("old", "n7"), "foreign"),
            ("stray", json!({"app": "web"}), carrying("deleted", "n8"), "tracked"),
            ("other", json!({"app": "web"}), json!({}), "ignored"),
        ];
        let pods: Vec<_> = rows.iter().map(|(n, l, a, _)| pod(n, l.clone(), a.clone())).collect();
        let o = observe(&valid, &pods, &[old, mesh.clone()]);
        for (name, _, _, want) in rows {
            let selected = o.selected.contains_key(name);
            let got = match () {
                _ if o.conflicted.contains(name) => "conflicted",
                _ if selected && o.carried.contains_key(name) => "selected+carried",
                _ if selected => "selected",
                _ if o.foreign.pod(name).is_some() => "foreign",
                _ if o.pods.contains_key(name) => "tracked",
                _ => "ignored",
            };
            assert_eq!(got, want, "Pod {name}");
        }
        assert_eq!(o.foreign.id("n7"), Some("old"), "the ids another policy links");
        assert!(o.pods["stray"].keys.policy().is_none(), "keys naming a deleted policy are strays");
        assert_eq!(o.namespace_pods.len(), 6);
    }
}
