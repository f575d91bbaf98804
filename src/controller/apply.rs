//! Diff and apply: the peer assignment each Pod should carry, compared with what it carries, and
//! server-side apply of exactly the Pods that differ, link removals before link additions.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::membership::Peer;
use super::{Error, FIELD_MANAGER};
use crate::api::{LINKS_ANNOTATION, PEERS_ANNOTATION, POLICY_ANNOTATION};

/// The three annotations of §3.2 for one Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub peers: Vec<Peer>,
    pub links: usize,
    pub policy: String,
}

impl Assignment {
    fn annotations(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            (PEERS_ANNOTATION, serde_json::to_string(&self.peers).expect("peers serialize")),
            (LINKS_ANNOTATION, self.links.to_string()),
            (POLICY_ANNOTATION, self.policy.clone()),
        ])
    }
}

/// The assignment a Pod carries now, if it carries one; unparseable peers count as none (and are
/// overwritten).
pub fn current(pod: &Pod) -> Option<Assignment> {
    let a = pod.annotations();
    let policy = a.get(POLICY_ANNOTATION)?.clone();
    let peers = a.get(PEERS_ANNOTATION).and_then(|p| serde_json::from_str(p).ok()).unwrap_or_default();
    let links = a.get(LINKS_ANNOTATION).and_then(|l| l.parse().ok()).unwrap_or(0);
    Some(Assignment { peers, links, policy })
}

/// One Pod write: its new assignment, or `None` to remove ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub pod: String,
    /// The Pod's UID as the plan saw it: the write applies to that Pod only, never to one deleted since
    /// (server-side apply would otherwise try to create it) or recreated under the same name.
    pub uid: Option<String>,
    pub to: Option<Assignment>,
    /// Whether it drops a link the Pod carries now: such writes go first.
    pub removes: bool,
}

/// The writes that take each Pod from `now` to `want`: nothing for a Pod that already matches. `uids`
/// names the Pods' UIDs.
pub fn diff(
    now: &BTreeMap<String, Option<Assignment>>,
    want: &BTreeMap<String, Option<Assignment>>,
    uids: &HashMap<String, String>,
) -> Vec<Change> {
    let mut changes: Vec<Change> = want
        .iter()
        .filter(|(pod, to)| now.get(*pod).cloned().flatten() != **to)
        .map(|(pod, to)| {
            let before: BTreeSet<&str> =
                now.get(pod).into_iter().flatten().flat_map(|a| a.peers.iter().map(|p| p.node_id.as_str())).collect();
            let after: BTreeSet<&str> = to.iter().flat_map(|a| a.peers.iter().map(|p| p.node_id.as_str())).collect();
            let removes = !before.is_subset(&after) || to.is_none();
            Change { pod: pod.clone(), uid: uids.get(pod).cloned(), to: to.clone(), removes }
        })
        .collect();
    changes.sort_by_key(|c| (!c.removes, c.pod.clone()));
    changes
}

/// Applies `changes` with at most `concurrency` writes in flight: every removing write completes before
/// the first adding one starts. Returns the number of Pods patched.
pub async fn apply(api: &Api<Pod>, changes: &[Change], concurrency: usize) -> Result<usize, Error> {
    let (removing, adding): (Vec<&Change>, Vec<&Change>) = changes.iter().partition(|c| c.removes);
    let mut done = 0;
    for wave in [removing, adding] {
        let results: Vec<Result<(), kube::Error>> = futures::stream::iter(wave.into_iter().cloned())
            .map(|c| {
                let api = api.clone();
                async move { patch(&api, &c).await }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
        done += results.len() - failed.len();
        if let Some(first) = failed.first() {
            return Err(Error::Apply { failed: failed.len(), total: changes.len(), first: first.clone() });
        }
    }
    Ok(done)
}

async fn patch(api: &Api<Pod>, change: &Change) -> Result<(), kube::Error> {
    let annotations = change.to.as_ref().map(Assignment::annotations).unwrap_or_default();
    let body = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": change.pod, "uid": change.uid, "annotations": annotations}});
    match api.patch(&change.pod, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await {
        // The Pod the plan saw is gone (404, or 409 from the UID precondition: field conflicts cannot happen
        // under force) or was replaced (422 on the immutable UID): it needs no annotations, and the
        // watch event of its successor brings a fresh plan.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 || uid_mismatch(&s) => Ok(()),
        other => other.map(|_| ()),
    }
}

fn uid_mismatch(s: &kube::core::Status) -> bool {
    s.code == 422 && s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.field == "metadata.uid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(peers: &[&str]) -> Option<Assignment> {
        Some(Assignment {
            peers: peers.iter().map(|p| Peer { node_id: p.to_string(), url: format!("ws://{p}") }).collect(),
            links: peers.len(),
            policy: "p".into(),
        })
    }

    #[test]
    fn only_changed_pods_and_removals_first() {
        let now = BTreeMap::from([
            ("same".to_string(), a(&["x"])),
            ("grows".to_string(), a(&["x"])),
            ("shrinks".to_string(), a(&["x", "y"])),
            ("leaves".to_string(), a(&["x"])),
            ("new".to_string(), None),
        ]);
        let want = BTreeMap::from([
            ("same".to_string(), a(&["x"])),
            ("grows".to_string(), a(&["x", "y"])),
            ("shrinks".to_string(), a(&["y"])),
            ("leaves".to_string(), None),
            ("new".to_string(), a(&["z"])),
        ]);
        let changes = diff(&now, &want, &HashMap::new());
        let order: Vec<(&str, bool)> = changes.iter().map(|c| (c.pod.as_str(), c.removes)).collect();
        assert_eq!(order, vec![("leaves", true), ("shrinks", true), ("grows", false), ("new", false)]);
    }

    #[test]
    fn a_pod_without_ours_needs_no_removal() {
        let now = BTreeMap::from([("p".to_string(), None)]);
        let want = BTreeMap::from([("p".to_string(), None)]);
        assert!(diff(&now, &want, &HashMap::new()).is_empty());
    }
}
