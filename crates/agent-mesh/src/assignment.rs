//! The peer assignment an agent Pod carries (the `agentmesh.dev/*` annotations): its one home. The operator
//! (which writes it), `kubectl mesh` (which shows it) and the agents (which obey it) all read it through
//! here. No Kubernetes types: an annotation map in, an [`Assignment`] out, and back.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

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
/// The policy's cap (`maxPeers`) when the assignment was written. Optional: an assignment written before
/// the key existed carries none, and its agent holds its own `--max-peers` alone.
pub const MAX_PEERS: &str = "agentmesh.dev/max-peers";
/// Standby peers this agent dials only while a planned peer is lost: a JSON array of [`Standby`], best
/// first. Optional, like `max-peers`.
pub const STANDBYS: &str = "agentmesh.dev/standbys";
/// Node ids allowed to dial this agent as a standby: a JSON array of strings, sorted. Optional.
pub const STANDBY_ACCEPTS: &str = "agentmesh.dev/standby-accepts";
/// Every key the controller writes, and removes when a Pod stops being an agent.
pub const KEYS: [&str; 7] = [PEERS, ACCEPTS, LINKS, POLICY, MAX_PEERS, STANDBYS, STANDBY_ACCEPTS];
/// The keys every assignment carries.
const REQUIRED: [&str; 4] = [PEERS, ACCEPTS, LINKS, POLICY];
/// No policy may allow more (the CRD's bound on `maxPeers`); a larger value is malformed.
pub const MAX_PEERS_LIMIT: usize = 64;

/// A node id or URL in an assignment (the operator also names Pods with it). Cheap to clone, and
/// shareable: the operator keeps one copy of each across the thousands of cached assignments that name it
/// (see [`Assignment::names_mut`]), and two shared copies compare without reading their bytes.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Name(Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both are the one shared copy.
    pub fn is_shared_with(&self, other: &Name) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.is_shared_with(other) || self.0 == other.0
    }
}

impl Eq for Name {}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        if self.is_shared_with(other) { std::cmp::Ordering::Equal } else { self.0.cmp(&other.0) }
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

// By content, as `Eq` compares, and as `str` hashes (so a map keyed by names is searched by `&str`).
impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(s.into())
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name(s.into())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Name(s.as_str().into())
    }
}

impl From<Arc<str>> for Name {
    fn from(s: Arc<str>) -> Self {
        Name(s)
    }
}

impl From<Name> for Arc<str> {
    fn from(n: Name) -> Self {
        n.0
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry of the `agentmesh.dev/peers` annotation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub node_id: Name,
    pub url: Name,
}

/// One entry of the `agentmesh.dev/standbys` annotation: a peer to dial while the planned peer `for` is
/// lost (docs/design.md §4, *Standby peers*). Rank 2 (written only when not 1) is tried only once the
/// rank-1 pairs around the lost peer have had their chance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Standby {
    pub node_id: Name,
    pub url: Name,
    #[serde(rename = "for")]
    pub stands_for: Name,
    #[serde(default = "first_rank", skip_serializing_if = "is_first_rank")]
    pub rank: u8,
}

fn first_rank() -> u8 {
    1
}

fn is_first_rank(rank: &u8) -> bool {
    *rank == 1
}

/// At most this many standby entries, and standby accepts: two per planned link.
pub const MAX_STANDBYS: usize = 2 * MAX_PEERS_LIMIT;

/// What one agent Pod carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Sorted by node id.
    pub peers: Vec<Peer>,
    /// Sorted.
    pub accepts: Vec<Name>,
    pub policy: String,
    /// The policy's cap: the agent holds the lower of it and its own. `None` when written without one.
    pub max_peers: Option<usize>,
    /// Best first; each names a planned peer and is none itself.
    pub standbys: Vec<Standby>,
    /// Sorted; none is a planned peer.
    pub standby_accepts: Vec<Name>,
}

impl Assignment {
    /// A well-formed assignment: peers and accepts sorted and without duplicates.
    pub fn new(mut peers: Vec<Peer>, accepts: impl IntoIterator<Item = Name>, policy: String) -> Self {
        peers.sort();
        peers.dedup_by(|a, b| a.node_id == b.node_id);
        let accepts: BTreeSet<Name> = accepts.into_iter().collect();
        Self { peers, accepts: accepts.into_iter().collect(), policy, ..Self::default() }
    }

    /// The same assignment with standby peers (kept in their order) and standby accepts (sorted).
    pub fn with_standbys(self, standbys: Vec<Standby>, accepts: impl IntoIterator<Item = Name>) -> Self {
        let accepts: BTreeSet<Name> = accepts.into_iter().collect();
        Self { standbys, standby_accepts: accepts.into_iter().collect(), ..self }
    }

    /// The same assignment, carrying the policy's cap.
    pub fn with_max_peers(self, max_peers: usize) -> Self {
        Self { max_peers: Some(max_peers), ..self }
    }

    /// The cap an agent whose own is `own` holds under this assignment.
    pub fn cap(&self, own: usize) -> usize {
        self.max_peers.map_or(own, |m| m.min(own))
    }

    /// Links this assignment gives its agent: the distinct node ids it dials or accepts.
    pub fn links(&self) -> usize {
        self.linked_ids().len()
    }

    /// Every node id this agent may hold a link with.
    pub fn linked_ids(&self) -> BTreeSet<&str> {
        self.peers.iter().map(|p| p.node_id.as_str()).chain(self.accepts.iter().map(Name::as_str)).collect()
    }

    /// Every node id and URL it names, to replace each with a shared copy.
    pub fn names_mut(&mut self) -> impl Iterator<Item = &mut Name> {
        let peers = self.peers.iter_mut().flat_map(|p| [&mut p.node_id, &mut p.url]);
        let standbys = self.standbys.iter_mut().flat_map(|s| [&mut s.node_id, &mut s.url, &mut s.stands_for]);
        peers.chain(&mut self.accepts).chain(standbys).chain(&mut self.standby_accepts)
    }

    /// What both `self` and `other` allow: the assignment an agent can move to from either without
    /// gaining a link (a peer whose URL changed counts as a different peer), under the lower cap.
    pub fn intersect(&self, other: &Assignment) -> Assignment {
        let peers = self.peers.iter().filter(|p| other.peers.contains(p)).cloned().collect();
        let accepts = self.accepts.iter().filter(|a| other.accepts.contains(a)).cloned();
        let max_peers = match (self.max_peers, other.max_peers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let both = Assignment { max_peers, ..Assignment::new(peers, accepts, self.policy.clone()) };
        // A standby for a peer the intersection dropped (its URL changed) would be malformed.
        let planned = both.linked_ids();
        let standbys = self
            .standbys
            .iter()
            .filter(|s| other.standbys.contains(s) && planned.contains(s.stands_for.as_str()))
            .cloned()
            .collect();
        let standby_accepts = self.standby_accepts.iter().filter(|a| other.standby_accepts.contains(a)).cloned();
        both.with_standbys(standbys, standby_accepts)
    }

    /// Whether an agent moving from `self` to `other` may hold fewer links: its cap drops.
    pub fn lowers_cap_to(&self, other: &Assignment) -> bool {
        other.max_peers.is_some_and(|o| self.max_peers.is_none_or(|s| o < s))
    }

    /// The annotations that carry it.
    pub fn to_annotations(&self) -> BTreeMap<&'static str, String> {
        let mut annotations = BTreeMap::from([
            (PEERS, serde_json::to_string(&self.peers).expect("peers serialize")),
            (ACCEPTS, serde_json::to_string(&self.accepts).expect("accepts serialize")),
            (LINKS, self.links().to_string()),
            (POLICY, self.policy.clone()),
        ]);
        if let Some(m) = self.max_peers {
            annotations.insert(MAX_PEERS, m.to_string());
        }
        if !self.standbys.is_empty() {
            annotations.insert(STANDBYS, serde_json::to_string(&self.standbys).expect("standbys serialize"));
        }
        if !self.standby_accepts.is_empty() {
            let accepts = serde_json::to_string(&self.standby_accepts).expect("standby accepts serialize");
            annotations.insert(STANDBY_ACCEPTS, accepts);
        }
        annotations
    }

    /// The assignment in `annotations`, if they name a policy. Unparseable peers or accepts count as none
    /// (the controller overwrites them); a missing `accepts` (written before it existed) counts as empty.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Option<Assignment> {
        let policy = annotations.get(POLICY)?.clone();
        let peers = annotations.get(PEERS).and_then(|p| serde_json::from_str(p).ok()).unwrap_or_default();
        let accepts: Vec<Name> =
            annotations.get(ACCEPTS).and_then(|a| serde_json::from_str(a).ok()).unwrap_or_default();
        let max_peers = annotations.get(MAX_PEERS).and_then(|m| m.parse().ok());
        let standbys = annotations.get(STANDBYS).and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
        let standby_accepts: Vec<Name> =
            annotations.get(STANDBY_ACCEPTS).and_then(|a| serde_json::from_str(a).ok()).unwrap_or_default();
        Some(
            Assignment { peers, accepts, policy, max_peers, ..Assignment::default() }
                .with_standbys(standbys, standby_accepts),
        )
    }

    /// The assignment an agent obeys, read strictly: `Ok(None)` when the annotations carry none of the four
    /// required keys (the agent is not assigned: it holds no links); an error when they carry some but not
    /// all, or a value that does not parse, or a link count that disagrees with the lists or exceeds the
    /// cap. A half-written or tampered assignment is reported and never applied.
    pub fn from_annotations_strict(annotations: &BTreeMap<String, String>) -> Result<Option<Assignment>, Malformed> {
        // A cap alone assigns nothing: an older operator, which knows only the four keys, leaves it when it
        // releases the Pod.
        if !REQUIRED.iter().any(|k| annotations.contains_key(*k)) {
            return Ok(None);
        }
        if let Some(missing) = REQUIRED.iter().find(|k| !annotations.contains_key(**k)) {
            return Err(Malformed::Missing(missing));
        }
        let get = |key: &'static str| annotations.get(key).ok_or(Malformed::Missing(key));
        let json = |key: &'static str, e: serde_json::Error| Malformed::Value { key, error: e.to_string() };
        let peers: Vec<Peer> = serde_json::from_str(get(PEERS)?).map_err(|e| json(PEERS, e))?;
        let accepts: Vec<Name> = serde_json::from_str(get(ACCEPTS)?).map_err(|e| json(ACCEPTS, e))?;
        let links = get(LINKS)?;
        let a = Assignment::new(peers, accepts, get(POLICY)?.clone());
        if links.parse::<usize>().ok() != Some(a.links()) {
            return Err(Malformed::LinkCount { written: links.chars().take(32).collect(), counted: a.links() });
        }
        let a = Self::standbys_strict(annotations, a)?;
        let Some(written) = annotations.get(MAX_PEERS) else { return Ok(Some(a)) };
        let cap = written.parse::<usize>().ok().filter(|m| *m <= MAX_PEERS_LIMIT);
        match cap {
            Some(m) if a.links() <= m => Ok(Some(a.with_max_peers(m))),
            _ => Err(Malformed::Cap { written: written.chars().take(32).collect(), counted: a.links() }),
        }
    }

    /// `a` with the optional standby keys read strictly: each standby stands for a planned peer and is
    /// none itself, and neither list is longer than [`MAX_STANDBYS`].
    fn standbys_strict(annotations: &BTreeMap<String, String>, a: Assignment) -> Result<Assignment, Malformed> {
        let json = |key: &'static str, e: serde_json::Error| Malformed::Value { key, error: e.to_string() };
        let standbys: Vec<Standby> = match annotations.get(STANDBYS) {
            Some(s) => serde_json::from_str(s).map_err(|e| json(STANDBYS, e))?,
            None => Vec::new(),
        };
        let accepts: Vec<Name> = match annotations.get(STANDBY_ACCEPTS) {
            Some(s) => serde_json::from_str(s).map_err(|e| json(STANDBY_ACCEPTS, e))?,
            None => Vec::new(),
        };
        let planned = a.linked_ids();
        let bad = |key: &'static str, error: String| Err(Malformed::Value { key, error });
        if standbys.len() > MAX_STANDBYS || accepts.len() > MAX_STANDBYS {
            return bad(STANDBYS, format!("more than {MAX_STANDBYS} standby entries or accepts"));
        }
        if let Some(s) = standbys.iter().find(|s| !(1..=2).contains(&s.rank)) {
            return bad(STANDBYS, format!("rank {} is not 1 or 2", s.rank));
        }
        if let Some(s) = standbys.iter().find(|s| !planned.contains(s.stands_for.as_str())) {
            return bad(STANDBYS, format!("stands for {:?}, which is not a planned peer", short(&s.stands_for)));
        }
        let named = standbys.iter().map(|s| (STANDBYS, &s.node_id)).chain(accepts.iter().map(|a| (STANDBY_ACCEPTS, a)));
        if let Some((key, id)) = named.into_iter().find(|(_, id)| planned.contains(id.as_str())) {
            return bad(key, format!("names the planned peer {:?}", short(id)));
        }
        Ok(a.with_standbys(standbys, accepts))
    }
}

/// A node id cut short for a message.
fn short(id: &str) -> String {
    id.chars().take(16).collect()
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
    #[error("annotation agentmesh.dev/max-peers is {written:?}: not a cap of 0 to 64 that {counted} links fit under")]
    Cap { written: String, counted: usize },
}

/// The first way the published assignments (node id → what its Pod carries) break the cap rule, if any.
/// Each agent's cap is the lower of `own` (the agents' `--max-peers`) and the cap its assignment carries.
/// A violation is: an agent allowed more than its cap by its own annotations (dials plus accepts); an
/// agent whose links in the published dial lists (what it dials plus who dials it) exceed its cap, or the
/// cap of a dialer that still lists it (a dialer on an older plan lists a link of that plan, which that
/// plan's cap bounds); a link dialed from both ends; an agent that dials or accepts itself. The history
/// checker of the end-to-end tests and the decide step's property tests both judge by this one function.
pub fn first_violation(published: &BTreeMap<String, Assignment>, own: usize) -> Option<String> {
    let mut inbound: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (id, a) in published {
        for p in &a.peers {
            inbound.entry(p.node_id.as_str()).or_default().insert(id.as_str());
        }
    }
    for (id, a) in published {
        let linked = a.linked_ids();
        let cap = a.cap(own);
        if linked.contains(id.as_str()) {
            return Some(format!("{id} dials or accepts itself"));
        }
        if linked.len() > cap {
            return Some(format!("{id} may hold {} links (dials + accepts) over the cap {cap}", linked.len()));
        }
        let dialers = inbound.get(id.as_str());
        let mut links: BTreeSet<&str> = a.peers.iter().map(|p| p.node_id.as_str()).collect();
        links.extend(dialers.into_iter().flatten());
        let bound = dialers.into_iter().flatten().map(|d| published[*d].cap(own)).fold(cap, usize::max);
        if links.len() > bound {
            return Some(format!("{id} has {} links in the published dial lists, over the cap {bound}", links.len()));
        }
        if let Some(p) = a.peers.iter().find(|p| dialers.is_some_and(|i| i.contains(&*p.node_id))) {
            return Some(format!("the link {id} – {} is dialed from both ends", p.node_id));
        }
        if let Some(why) = standby_violation(published, id, a) {
            return Some(why);
        }
    }
    None
}

/// How `a`'s standbys break the rules: one names its own agent, or a standby link is dialed from both ends.
/// (Standby links count against the cap at the agents, which hold them only in free slots.)
fn standby_violation(published: &BTreeMap<String, Assignment>, id: &str, a: &Assignment) -> Option<String> {
    let mut named = a.standbys.iter().map(|s| &s.node_id).chain(&a.standby_accepts);
    if named.any(|s| s == id) {
        return Some(format!("{id} names itself as a standby"));
    }
    let both =
        |s: &&Standby| published.get(s.node_id.as_str()).is_some_and(|b| b.standbys.iter().any(|t| t.node_id == id));
    a.standbys.iter().find(both).map(|s| format!("the standby link {id} – {} is dialed from both ends", s.node_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> Peer {
        Peer { node_id: id.into(), url: format!("ws://{id}:1/").into() }
    }

    #[test]
    fn names_order_as_their_text_whether_shared_or_not() {
        let words = ["", "a", "ab", "b", "agent-10", "agent-9"];
        for x in words {
            for y in words {
                let (a, b) = (Name::from(x), Name::from(y));
                assert_eq!(a.cmp(&b), x.cmp(y), "{x:?} vs {y:?}");
                assert_eq!(a == b, x == y);
            }
            let shared = Name::from(x);
            assert_eq!(shared.cmp(&shared.clone()), std::cmp::Ordering::Equal);
        }
    }

    #[test]
    fn round_trips_through_annotations() {
        let a = Assignment::new(vec![peer("b"), peer("a")], ["c".into()], "p".into());
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
        assert_eq!(both.accepts, vec![Name::from("d")]);
        assert_eq!(both.links(), 2);
    }

    #[test]
    fn the_checker_names_each_violation() {
        let a = |peers: &[&str], accepts: &[&str]| {
            Assignment::new(peers.iter().map(|p| peer(p)).collect(), accepts.iter().map(|&s| s.into()), "p".into())
        };
        let ok = BTreeMap::from([("a".into(), a(&["b"], &[])), ("b".into(), a(&[], &["a"]))]);
        assert_eq!(first_violation(&ok, 1), None);
        let both = BTreeMap::from([("a".into(), a(&["b"], &[])), ("b".into(), a(&["a"], &[]))]);
        assert!(first_violation(&both, 2).unwrap().contains("both ends"));
        let hub =
            BTreeMap::from([("a".into(), a(&["h"], &[])), ("b".into(), a(&["h"], &[])), ("h".into(), a(&[], &["a"]))]);
        assert!(first_violation(&hub, 1).unwrap().contains("h has 2 links"), "{:?}", first_violation(&hub, 1));
        let greedy = BTreeMap::from([("a".into(), a(&["b"], &["c"]))]);
        assert!(first_violation(&greedy, 1).unwrap().contains("dials + accepts"));
        let selfish = BTreeMap::from([("a".into(), a(&[], &["a"]))]);
        assert!(first_violation(&selfish, 4).unwrap().contains("itself"));
        let lowered = BTreeMap::from([("a".into(), a(&["b"], &["c"]).with_max_peers(1))]);
        assert!(first_violation(&lowered, 4).unwrap().contains("over the cap 1"), "the carried cap counts");
        let raised = BTreeMap::from([("a".into(), a(&["b"], &["c"]).with_max_peers(8))]);
        assert!(first_violation(&raised, 1).unwrap().contains("over the cap 1"), "never above the agent's own");
    }

    #[test]
    fn a_dialer_on_an_older_plan_is_judged_by_that_plans_cap() {
        let a = |peers: &[&str], accepts: &[&str], cap: usize| {
            let peers = peers.iter().map(|p| peer(p)).collect();
            Assignment::new(peers, accepts.iter().map(|&s| s.into()), "p".into()).with_max_peers(cap)
        };
        // h moved to cap 1 (keeping only x); a and b, still on the cap-4 plan, list it.
        let mut fleet = BTreeMap::from([
            ("h".into(), a(&[], &["x"], 1)),
            ("a".into(), a(&["h"], &[], 4)),
            ("b".into(), a(&["h"], &[], 4)),
        ]);
        assert_eq!(first_violation(&fleet, 4), None);
        // Once both dialers are on the cap-1 plan, h's dial-list links count against 1.
        fleet.insert("a".into(), a(&["h"], &[], 1));
        fleet.insert("b".into(), a(&["h"], &[], 1));
        assert!(first_violation(&fleet, 4).unwrap().contains("h has 2 links"), "{:?}", first_violation(&fleet, 4));
    }

    #[test]
    fn the_strict_reader_refuses_what_is_partial_or_inconsistent() {
        let a = Assignment::new(vec![peer("b")], ["c".into()], "p".into());
        let full: BTreeMap<String, String> = a.to_annotations().into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(Assignment::from_annotations_strict(&full), Ok(Some(a)));
        assert_eq!(Assignment::from_annotations_strict(&BTreeMap::new()), Ok(None));
        let mut partial = full.clone();
        partial.remove(ACCEPTS);
        assert_eq!(Assignment::from_annotations_strict(&partial), Err(Malformed::Missing(ACCEPTS)));
        let mut lying = full.clone();
        lying.insert(LINKS.into(), "1".into());
        assert!(matches!(Assignment::from_annotations_strict(&lying), Err(Malformed::LinkCount { counted: 2, .. })));
        let mut garbage = full.clone();
        garbage.insert(PEERS.into(), "[{".into());
        assert!(matches!(Assignment::from_annotations_strict(&garbage), Err(Malformed::Value { key: PEERS, .. })));
        let mut only_a_cap = BTreeMap::new();
        only_a_cap.insert(MAX_PEERS.to_string(), "4".to_string());
        assert_eq!(Assignment::from_annotations_strict(&only_a_cap), Ok(None), "a stranded cap assigns nothing");
        for bad in ["1", "65", "-1", "two", ""] {
            let mut capped = full.clone();
            capped.insert(MAX_PEERS.into(), bad.into());
            let read = Assignment::from_annotations_strict(&capped);
            assert!(matches!(read, Err(Malformed::Cap { counted: 2, .. })), "max-peers {bad:?}: {read:?}");
        }
    }

    #[test]
    fn the_cap_travels_with_the_assignment_and_the_lower_one_wins() {
        let a = Assignment::new(vec![peer("b")], ["c".into()], "p".into()).with_max_peers(2);
        let ann: BTreeMap<String, String> = a.to_annotations().into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(ann[MAX_PEERS], "2");
        assert_eq!(Assignment::from_annotations_strict(&ann), Ok(Some(a.clone())));
        assert_eq!(Assignment::from_annotations(&ann), Some(a.clone()));
        assert_eq!((a.cap(4), a.cap(1)), (2, 1), "the lower of the policy's and the agent's own");
        let uncapped = Assignment::new(vec![peer("b")], [], "p".into());
        assert_eq!(uncapped.cap(3), 3);
        let four = a.clone().with_max_peers(4);
        assert_eq!(four.intersect(&a).max_peers, Some(2));
        assert_eq!(uncapped.intersect(&a).max_peers, Some(2));
        assert!(four.lowers_cap_to(&a) && uncapped.lowers_cap_to(&a));
        assert!(!a.lowers_cap_to(&four) && !a.lowers_cap_to(&uncapped));
    }

    fn standby(id: &str, stands_for: &str) -> Standby {
        Standby { node_id: id.into(), url: format!("ws://{id}:1/").into(), stands_for: stands_for.into(), rank: 1 }
    }

    #[test]
    fn standbys_round_trip_and_are_read_strictly() {
        let a = Assignment::new(vec![peer("b")], ["c".into()], "p".into())
            .with_standbys(vec![standby("y", "c"), Standby { rank: 2, ..standby("x", "b") }], ["z".into()]);
        let ann: BTreeMap<String, String> = a.to_annotations().into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(
            ann[STANDBYS],
            r#"[{"nodeId":"y","url":"ws://y:1/","for":"c"},{"nodeId":"x","url":"ws://x:1/","for":"b","rank":2}]"#
        );
        assert_eq!(ann[LINKS], "2", "standbys are not planned links");
        assert_eq!(Assignment::from_annotations_strict(&ann), Ok(Some(a.clone())));
        assert_eq!(Assignment::from_annotations(&ann), Some(a.clone()));
        let bare = Assignment::new(vec![peer("b")], ["c".into()], "p".into());
        assert!(!bare.to_annotations().contains_key(STANDBYS), "no standbys, no key");
        let cases = [
            (STANDBYS, r#"[{"nodeId":"y","url":"u","for":"q"}]"#, "not a planned peer"),
            (STANDBYS, r#"[{"nodeId":"c","url":"u","for":"b"}]"#, "names the planned peer"),
            (STANDBY_ACCEPTS, r#"["b"]"#, "names the planned peer"),
            (STANDBYS, r#"[{"nodeId":"y"}]"#, "missing field"),
            (STANDBYS, r#"[{"nodeId":"y","url":"u","for":"b","rank":3}]"#, "rank 3"),
            (STANDBY_ACCEPTS, r#"{"#, "expected a sequence"),
        ];
        for (key, value, why) in cases {
            let mut bad = ann.clone();
            bad.insert(key.into(), value.into());
            let read = Assignment::from_annotations_strict(&bad);
            assert!(
                matches!(&read, Err(Malformed::Value { error, .. }) if error.contains(why)),
                "{key}={value}: {read:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_STANDBYS).map(|i| format!("s{i}")).collect();
        let mut long = ann.clone();
        long.insert(STANDBY_ACCEPTS.into(), serde_json::to_string(&many).unwrap());
        assert!(Assignment::from_annotations_strict(&long).is_err());
        let x = Standby { rank: 2, ..standby("x", "b") };
        let other = a.clone().with_standbys(vec![x.clone(), standby("y", "b")], ["z".into(), "w".into()]);
        let both = a.intersect(&other);
        assert_eq!((both.standbys, both.standby_accepts), (vec![x], vec![Name::from("z")]));
        // b moved: the intersection drops it, and the standbys for it, so it reads back strictly.
        let mut moved = Assignment { peers: vec![Peer { url: "ws://b:2/".into(), ..peer("b") }], ..a.clone() };
        moved.standbys.push(standby("v", "b"));
        let both = a.intersect(&moved);
        assert!(both.standbys.iter().all(|s| s.stands_for != "b"), "{both:?}");
        let ann = both.to_annotations().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(Assignment::from_annotations_strict(&ann), Ok(Some(both)));
    }

    #[test]
    fn the_checker_names_standby_violations() {
        let a = |peers: &[&str], standbys: &[&str]| {
            let standbys = standbys.iter().map(|s| standby(s, "p")).collect();
            Assignment::new(peers.iter().map(|p| peer(p)).collect(), [], "p".into()).with_standbys(standbys, [])
        };
        let both = BTreeMap::from([("a".into(), a(&[], &["b"])), ("b".into(), a(&[], &["a"]))]);
        assert!(first_violation(&both, 2).unwrap().contains("standby link a – b is dialed from both ends"));
        let selfish = BTreeMap::from([("a".into(), a(&[], &["a"]))]);
        assert!(first_violation(&selfish, 2).unwrap().contains("names itself"));
        let fine = BTreeMap::from([("a".into(), a(&[], &["b"])), ("b".into(), a(&[], &[]))]);
        assert_eq!(first_violation(&fine, 2), None);
    }

    #[test]
    fn garbage_counts_as_none_and_a_missing_policy_as_no_assignment() {
        let ann = BTreeMap::from([(POLICY.to_string(), "p".into()), (PEERS.to_string(), "{oops".to_string())]);
        assert_eq!(Assignment::from_annotations(&ann).unwrap().peers, vec![]);
        let stray = BTreeMap::from([(PEERS.to_string(), "[]".to_string())]);
        assert_eq!(Assignment::from_annotations(&stray), None);
    }
}
