//! The peer assignment an agent Pod carries (the `agentmesh.dev/*` annotations): its one home. The operator
//! (which writes it), `kubectl mesh` (which shows it) and the agents (which obey it) all read it through
//! here. No Kubernetes types: an annotation map in, an [`Assignment`] out, and back.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Every annotation of ours starts with this.
pub const PREFIX: &str = "agentmesh.dev/";
/// Where an agent Pod carries its node id, unless its MeshPolicy names another annotation.
pub const NODE_ID: &str = "agentmesh.dev/node-id";
/// Peers this agent dials: a JSON array of [`Peer`], sorted by node id.
pub const PEERS: &str = "agentmesh.dev/peers";
/// Node ids allowed to dial this agent: a JSON array of strings, sorted.
pub const ACCEPTS: &str = "agentmesh.dev/accepts";
/// This agent's planned link count (dialed + accepted).
pub const LINKS: &str = "agentmesh.dev/links";
/// The owning MeshPolicy's name.
pub const POLICY: &str = "agentmesh.dev/policy";
/// Every key the controller writes, and removes when a Pod stops being an agent.
pub const KEYS: [&str; 4] = [PEERS, ACCEPTS, LINKS, POLICY];

/// One entry of the `agentmesh.dev/peers` annotation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub node_id: String,
    pub url: String,
}

/// What one agent Pod carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Sorted by node id.
    pub peers: Vec<Peer>,
    /// Sorted.
    pub accepts: Vec<String>,
    pub policy: String,
}

impl Assignment {
    /// A well-formed assignment: peers and accepts sorted and without duplicates.
    pub fn new(mut peers: Vec<Peer>, accepts: impl IntoIterator<Item = String>, policy: String) -> Self {
        peers.sort();
        peers.dedup_by(|a, b| a.node_id == b.node_id);
        let accepts: BTreeSet<String> = accepts.into_iter().collect();
        Self { peers, accepts: accepts.into_iter().collect(), policy }
    }

    /// Links this assignment gives its agent: the distinct node ids it dials or accepts.
    pub fn links(&self) -> usize {
        self.linked_ids().len()
    }

    /// Every node id this agent may hold a link with.
    pub fn linked_ids(&self) -> BTreeSet<&str> {
        self.peers.iter().map(|p| p.node_id.as_str()).chain(self.accepts.iter().map(String::as_str)).collect()
    }

    /// What both `self` and `other` allow: the assignment an agent can move to from either without
    /// gaining a link (a peer whose URL changed counts as a different peer).
    pub fn intersect(&self, other: &Assignment) -> Assignment {
        let peers = self.peers.iter().filter(|p| other.peers.contains(p)).cloned().collect();
        let accepts = self.accepts.iter().filter(|a| other.accepts.contains(a)).cloned();
        Assignment::new(peers, accepts, self.policy.clone())
    }

    /// The annotations that carry it.
    pub fn to_annotations(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            (PEERS, serde_json::to_string(&self.peers).expect("peers serialize")),
            (ACCEPTS, serde_json::to_string(&self.accepts).expect("accepts serialize")),
            (LINKS, self.links().to_string()),
            (POLICY, self.policy.clone()),
        ])
    }

    /// The assignment in `annotations`, if they name a policy. Unparseable peers or accepts count as none
    /// (the controller overwrites them); a missing `accepts` (written before it existed) counts as empty.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Option<Assignment> {
        let policy = annotations.get(POLICY)?.clone();
        let peers = annotations.get(PEERS).and_then(|p| serde_json::from_str(p).ok()).unwrap_or_default();
        let accepts: Vec<String> =
            annotations.get(ACCEPTS).and_then(|a| serde_json::from_str(a).ok()).unwrap_or_default();
        Some(Assignment { peers, accepts, policy })
    }

    /// The assignment an agent obeys, read strictly: `Ok(None)` when the annotations carry none of the keys
    /// (the agent is not assigned: it holds no links); an error when they carry some but not all, or a value
    /// that does not parse, or a link count that disagrees with the lists. A half-written or tampered
    /// assignment is reported and never applied.
    pub fn from_annotations_strict(annotations: &BTreeMap<String, String>) -> Result<Option<Assignment>, Malformed> {
        if !KEYS.iter().any(|k| annotations.contains_key(*k)) {
            return Ok(None);
        }
        let get = |key: &'static str| annotations.get(key).ok_or(Malformed::Missing(key));
        let json = |key: &'static str, e: serde_json::Error| Malformed::Value { key, error: e.to_string() };
        let peers: Vec<Peer> = serde_json::from_str(get(PEERS)?).map_err(|e| json(PEERS, e))?;
        let accepts: Vec<String> = serde_json::from_str(get(ACCEPTS)?).map_err(|e| json(ACCEPTS, e))?;
        let links = get(LINKS)?;
        let a = Assignment::new(peers, accepts, get(POLICY)?.clone());
        if links.parse::<usize>().ok() != Some(a.links()) {
            return Err(Malformed::LinkCount { written: links.chars().take(32).collect(), counted: a.links() });
        }
        Ok(Some(a))
    }
}

/// Why an agent refuses to apply the assignment it reads.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("annotation {0} is missing while others of the assignment are present (half-written?)")]
    Missing(&'static str),
    #[error("annotation {key}: {error}")]
    Value { key: &'static str, error: String },
    #[error("annotation agentmesh.dev/links is {written:?} but the lists hold {counted} distinct peers")]
    LinkCount { written: String, counted: usize },
}

/// The first way the published assignments (node id → what its Pod carries) break the cap rule, if any:
/// an agent whose links from the published dial lists (what it dials plus who dials it) exceed `cap`; an
/// agent allowed more than `cap` links by its own annotations (dials plus accepts); a link dialed from
/// both ends; an agent that dials or accepts itself. The history checker of the end-to-end tests and the
/// decide step's property tests both judge by this one function.
pub fn first_violation(published: &BTreeMap<String, Assignment>, cap: usize) -> Option<String> {
    let mut inbound: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (id, a) in published {
        for p in &a.peers {
            inbound.entry(p.node_id.as_str()).or_default().insert(id.as_str());
        }
    }
    for (id, a) in published {
        let own = a.linked_ids();
        if own.contains(id.as_str()) {
            return Some(format!("{id} dials or accepts itself"));
        }
        if own.len() > cap {
            return Some(format!("{id} may hold {} links (dials + accepts) over the cap {cap}", own.len()));
        }
        let mut links: BTreeSet<&str> = a.peers.iter().map(|p| p.node_id.as_str()).collect();
        links.extend(inbound.get(id.as_str()).into_iter().flatten());
        if links.len() > cap {
            return Some(format!("{id} has {} links in the published dial lists, over the cap {cap}", links.len()));
        }
        if let Some(p) = a.peers.iter().find(|p| inbound.get(id.as_str()).is_some_and(|i| i.contains(&*p.node_id))) {
            return Some(format!("the link {id} – {} is dialed from both ends", p.node_id));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> Peer {
        Peer { node_id: id.into(), url: format!("ws://{id}:1/") }
    }

    #[test]
    fn round_trips_through_annotations() {
        let a = Assignment::new(vec![peer("b"), peer("a")], ["c".to_string()], "p".into());
        let ann: BTreeMap<String, String> = a.to_annotations().into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(ann[LINKS], "3");
        assert_eq!(ann[ACCEPTS], r#"["c"]"#);
        assert_eq!(Assignment::from_annotations(&ann), Some(a.clone()));
        assert_eq!(Assignment::from_annotations_strict(&ann), Ok(Some(a.clone())));
    }

    #[test]
    fn intersection_never_gains_a_link() {
        let before = Assignment::new(vec![peer("a"), peer("b")], ["c".into(), "d".into()], "p".into());
        let mut moved = peer("b");
        moved.url = "ws://elsewhere:1/".into();
        let after = Assignment::new(vec![peer("a"), moved, peer("x")], ["d".into(), "y".into()], "p".into());
        let both = before.intersect(&after);
        assert_eq!(both.peers, vec![peer("a")]);
        assert_eq!(both.accepts, vec!["d".to_string()]);
        assert_eq!(both.links(), 2);
    }

    #[test]
    fn the_checker_names_each_violation() {
        let a = |peers: &[&str], accepts: &[&str]| {
            Assignment::new(peers.iter().map(|p| peer(p)).collect(), accepts.iter().map(|s| s.to_string()), "p".into())
        };
        let ok = BTreeMap::from([("a".to_string(), a(&["b"], &[])), ("b".to_string(), a(&[], &["a"]))]);
        assert_eq!(first_violation(&ok, 1), None);
        let both = BTreeMap::from([("a".to_string(), a(&["b"], &[])), ("b".to_string(), a(&["a"], &[]))]);
        assert!(first_violation(&both, 2).unwrap().contains("both ends"));
        let hub = BTreeMap::from([
            ("a".to_string(), a(&["h"], &[])),
            ("b".to_string(), a(&["h"], &[])),
            ("h".to_string(), a(&[], &["a"])),
        ]);
        assert!(first_violation(&hub, 1).unwrap().contains("h has 2 links"), "{:?}", first_violation(&hub, 1));
        let greedy = BTreeMap::from([("a".to_string(), a(&["b"], &["c"]))]);
        assert!(first_violation(&greedy, 1).unwrap().contains("dials + accepts"));
        let selfish = BTreeMap::from([("a".to_string(), a(&[], &["a"]))]);
        assert!(first_violation(&selfish, 4).unwrap().contains("itself"));
    }

    #[test]
    fn the_strict_reader_refuses_what_is_partial_or_inconsistent() {
        let a = Assignment::new(vec![peer("b")], ["c".to_string()], "p".into());
        let full: BTreeMap<String, String> = a.to_annotations().into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(Assignment::from_annotations_strict(&full), Ok(Some(a)));
        assert_eq!(Assignment::from_annotations_strict(&BTreeMap::new()), Ok(None));
        let mut partial = full.clone();
        partial.remove(ACCEPTS);
        assert_eq!(Assignment::from_annotations_strict(&partial), Err(Malformed::Missing(ACCEPTS)));
        let mut lying = full.clone();
        lying.insert(LINKS.into(), "1".into());
        assert!(matches!(Assignment::from_annotations_strict(&lying), Err(Malformed::LinkCount { counted: 2, .. })));
        let mut garbage = full;
        garbage.insert(PEERS.into(), "[{".into());
        assert!(matches!(Assignment::from_annotations_strict(&garbage), Err(Malformed::Value { key: PEERS, .. })));
    }

    #[test]
    fn garbage_counts_as_none_and_a_missing_policy_as_no_assignment() {
        let ann = BTreeMap::from([(POLICY.to_string(), "p".to_string()), (PEERS.to_string(), "{oops".to_string())]);
        assert_eq!(Assignment::from_annotations(&ann).unwrap().peers, vec![]);
        let stray = BTreeMap::from([(PEERS.to_string(), "[]".to_string())]);
        assert_eq!(Assignment::from_annotations(&stray), None);
    }
}
