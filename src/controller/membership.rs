//! Membership (docs/design.md §3.3): which selected Pods are eligible agents, matched to which presence entry, and
//! at which URL their peers dial them. Pure: Pods and a snapshot in, a verdict per Pod out, kept between
//! reconciles ([`Verdicts`]) so that a Pod event costs that Pod's verdict, not the fleet's.
use std::cell::{OnceCell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use hashbrown::hash_table::{self, HashTable};

use super::observe::{Foreign, Observed};
use super::pods::CachedPod;
use super::policy::ValidPolicy;

use crate::assignment::Name;
use crate::presence::{Node, Snapshot};

/// Longest node id accepted: an Ed25519 key in hex is 64 bytes. Together with [`MAX_ADDRESS_BYTES`] this
/// keeps an agent's annotations (at most 64 peers) well under the API server's 256 KiB limit.
pub const MAX_NODE_ID_BYTES: usize = 256;
/// Longest advertised address accepted.
pub const MAX_ADDRESS_BYTES: usize = 2048;

/// An eligible agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    /// Shared with the Pod cache and the view's maps.
    pub pod: Name,
    /// Its node id and URL, shared by the targets that name it.
    pub node_id: Name,
    /// Where peers dial this agent: the advertised URL with an unspecified host replaced by the Pod IP.
    pub url: Name,
    pub domain: Option<String>,
    /// The planned peers it reports it cannot reach (node ids, from its presence entry).
    pub unreachable: crate::presence::Unreachable,
}

/// Why a selected Pod is not an agent in the plan. `kubectl mesh explain` and the status show these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    Terminating,
    NotReady,
    NoPodIp,
    NoPresence,
    NotAlive,
    StaleHeartbeat,
    NoAddress,
    IsRendezvous,
    BadAddress(String),
    AddressTooLong(usize),
    /// An empty node id, or one longer than [`MAX_NODE_ID_BYTES`] (its length).
    BadNodeId(usize),
    DuplicateNodeId {
        node_id: String,
        pods: Vec<String>,
    },
    /// Two presence entries match the Pod equally well (same key, liveness and heartbeat): `by` says
    /// how the Pod was matched (node id, hostname or IP), `node_ids` names both.
    AmbiguousPresence {
        by: &'static str,
        node_ids: [String; 2],
    },
    /// Carries, or is linked from, another policy's assignment: it joins once that policy let it go.
    OtherPolicy(String),
    /// Arrived while others were arriving: joins with them once arrivals pause (see `admission`).
    Arriving,
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Terminating => write!(f, "Pod is terminating"),
            Self::NotReady => write!(f, "Pod is not Ready"),
            Self::NoPodIp => write!(f, "Pod has no IP"),
            Self::NoPresence => write!(f, "no presence entry matches the Pod (node-id annotation, hostname or IP)"),
            Self::NotAlive => write!(f, "presence says the agent is not alive"),
            Self::StaleHeartbeat => write!(f, "presence heartbeat is older than heartbeatTimeout"),
            Self::NoAddress => write!(f, "presence entry has no address"),
            Self::IsRendezvous => write!(f, "the entry is the rendezvous itself"),
            Self::BadAddress(a) => write!(f, "address {a:?} is not a ws:// or wss:// URL"),
            Self::AddressTooLong(n) => write!(f, "address of {n} bytes is longer than {MAX_ADDRESS_BYTES}"),
            Self::BadNodeId(0) => write!(f, "presence entry has an empty node_id"),
            Self::BadNodeId(n) => write!(f, "node_id of {n} bytes is longer than {MAX_NODE_ID_BYTES}"),
            Self::OtherPolicy(p) => {
                write!(f, "carries or is linked from MeshPolicy {p:?}'s assignment; joins once {p:?} has released it")
            }
            Self::Arriving => write!(
                f,
                "arrived with others: joins the plan with them once arrivals pause for {:?} (at most {:?})",
                super::admission::QUIET,
                super::admission::MAX_HOLD
            ),
            Self::DuplicateNodeId { node_id, pods } => {
                write!(f, "node id {node_id} is claimed by Pods {}", pods.join(", "))
            }
            Self::AmbiguousPresence { by, node_ids: [a, b] } => {
                write!(f, "presence entries {a} and {b} match the Pod's {by} equally (both as alive, same heartbeat)")
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Membership {
    /// Eligible agents by Pod name (shared with their verdicts).
    pub agents: BTreeMap<Name, Arc<Agent>>,
    /// Every selected Pod that is not an agent, with the reason.
    pub excluded: BTreeMap<Name, Exclusion>,
}

impl Membership {
    pub fn agent(&self, pod: &str) -> Option<&Agent> {
        self.agents.get(pod).map(Arc::as_ref)
    }
}

pub struct Rules<'a> {
    pub node_id_annotation: &'a str,
    pub topology_key: Option<&'a str>,
    pub heartbeat_timeout: Duration,
    /// The snapshot's clock when it carries none of its own (the controller's clock at fetch time).
    pub fallback_now_ms: f64,
}

impl<'a> Rules<'a> {
    pub fn of(policy: &'a ValidPolicy, fallback_now_ms: f64) -> Self {
        Rules {
            node_id_annotation: &policy.node_id_annotation,
            topology_key: policy.topology_key.as_deref(),
            heartbeat_timeout: policy.heartbeat_timeout,
            fallback_now_ms,
        }
    }
}

/// The eligible agents of `policy` under `snap` judged on `confirmed_ms`, without those another policy
/// still holds, worked out from scratch. `node_domain` is a Node's `topologyKey` label.
pub fn of_policy(
    policy: &ValidPolicy,
    o: &Observed,
    snap: &Arc<Snapshot>,
    confirmed_ms: f64,
    node_domain: &dyn Fn(&str) -> Option<String>,
) -> Membership {
    let mut verdicts = Verdicts::default();
    verdicts.update(o, snap, &Rules::of(policy, confirmed_ms), node_domain, &Dirty::default());
    verdicts.members
}

/// What changed in an [`Observed`] since verdicts were last brought up to date: Pods filed again, and
/// node ids another policy's Pods began or stopped linking.
#[derive(Debug, Default)]
pub struct Dirty {
    pub pods: BTreeSet<Name>,
    pub ids: BTreeSet<String>,
}

/// Every selected Pod's verdict under one snapshot and clock, kept so that a Pod event judges that Pod
/// alone (and the Pods sharing its node id): a new snapshot or clock judges every Pod again.
///
/// A Pod's verdict is its own ([`candidate`]: its state and its presence entry); then two Pods claiming
/// one node id exclude each other, and an agent another policy holds is moved out. So a changed Pod
/// touches its own verdict and those of the Pods claiming the node ids it left and took; a changed
/// foreign Pod those claiming the ids it links.
#[derive(Default)]
pub struct Verdicts {
    index: Option<Index>,
    clock: f64,
    judged: BTreeMap<Name, Result<Arc<Agent>, Exclusion>>,
    /// (node id, Pod) for every Pod whose own verdict made it that id's agent: one tree, since most ids
    /// have one claimant.
    claims: BTreeSet<(Name, Name)>,
    members: Membership,
}

impl Verdicts {
    /// Brings the verdicts up to date with `o`: every selected Pod judged again when `snap` or the
    /// rules' clock differ from the last update's, else only what `dirty` names.
    pub fn update(
        &mut self,
        o: &Observed,
        snap: &Arc<Snapshot>,
        rules: &Rules,
        node_domain: &dyn Fn(&str) -> Option<String>,
        dirty: &Dirty,
    ) {
        let same = self.index.as_ref().is_some_and(|i| Arc::ptr_eq(&i.snapshot, snap))
            && self.clock.to_bits() == rules.fallback_now_ms.to_bits();
        // A Pod filed again is settled again even if its verdict stands: whether another policy holds it
        // may have changed.
        let mut touched: BTreeSet<Name> = dirty.pods.clone();
        let judge: BTreeSet<Name> = if same {
            dirty.pods.clone()
        } else {
            (self.index, self.clock) = (Some(Index::new(snap.clone())), rules.fallback_now_ms);
            self.judged.keys().chain(o.selected.keys()).cloned().collect()
        };
        for pod in judge {
            self.judge(pod, o, rules, node_domain, &mut touched);
        }
        for id in &dirty.ids {
            touched.extend(self.claimants(id).cloned());
        }
        for pod in &touched {
            self.settle(pod, &o.foreign);
        }
    }

    /// Judges Pod `pod` again; when its verdict changes, it and the Pods claiming the node ids it left or
    /// took go into `touched`.
    fn judge(
        &mut self,
        pod: Name,
        o: &Observed,
        rules: &Rules,
        node_domain: &dyn Fn(&str) -> Option<String>,
        touched: &mut BTreeSet<Name>,
    ) {
        let verdict = match (o.selected.get(&pod), self.index.as_ref()) {
            (Some(cached), Some(index)) => Some(candidate(cached, index, rules, node_domain).map(Arc::new)),
            _ => None,
        };
        if self.judged.get(&pod) == verdict.as_ref() {
            return;
        }
        if let Some(Ok(old)) = self.judged.remove(&pod) {
            self.claims.remove(&(old.node_id.clone(), pod.clone()));
            touched.extend(self.claimants(&old.node_id).cloned());
        }
        touched.insert(pod.clone());
        if let Some(Ok(agent)) = &verdict {
            self.claims.insert((agent.node_id.clone(), pod.clone()));
            touched.extend(self.claimants(&agent.node_id).cloned());
        }
        if let Some(verdict) = verdict {
            self.judged.insert(pod, verdict);
        }
    }

    /// The Pods claiming node id `id`, in name order.
    fn claimants<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Name> {
        let from = (Name::from(id), Name::default());
        self.claims.range(from..).take_while(move |(claimed, _)| claimed == id).map(|(_, pod)| pod)
    }

    /// Pod `pod`'s place in the membership, from its own verdict, the other claims on its node id, and
    /// `foreign`.
    fn settle(&mut self, pod: &Name, foreign: &Foreign) {
        self.members.agents.remove(pod);
        self.members.excluded.remove(pod);
        let why = match self.judged.get(pod) {
            None => return,
            Some(Err(why)) => why.clone(),
            Some(Ok(agent)) => {
                if self.claimants(&agent.node_id).nth(1).is_some() {
                    let pods = self.claimants(&agent.node_id).map(Name::to_string).collect();
                    Exclusion::DuplicateNodeId { node_id: agent.node_id.to_string(), pods }
                } else if let Some(owner) = foreign.pod(pod).or_else(|| foreign.id(&agent.node_id)) {
                    Exclusion::OtherPolicy(owner.to_owned())
                } else {
                    self.members.agents.insert(pod.clone(), agent.clone());
                    return;
                }
            }
        };
        self.members.excluded.insert(pod.clone(), why);
    }

    pub fn membership(&self) -> &Membership {
        &self.members
    }
}

/// The presence entry for one key (node id, hostname or IP), as a position in the snapshot's list.
/// Several entries can share a key: an agent recreated with a new key under its old hostname leaves its
/// dead entry behind until the rendezvous forgets it. The rule: an alive entry beats a dead one, then the
/// later heartbeat wins; two entries with different node ids that tie on both are ambiguous, and a Pod
/// matched by that key is excluded.
#[derive(Clone, Copy, Debug)]
enum Slot {
    One(u32),
    Tie(u32, u32),
}

impl Slot {
    fn first(self) -> u32 {
        match self {
            Slot::One(i) | Slot::Tie(i, _) => i,
        }
    }

    fn rank(n: &Node) -> (bool, f64) {
        (n.alive, n.heartbeat_ms().unwrap_or(f64::NEG_INFINITY))
    }

    fn with(self, i: u32, nodes: &[Node]) -> Slot {
        let (n, best) = (&nodes[i as usize], &nodes[self.first() as usize]);
        match Self::rank(n).partial_cmp(&Self::rank(best)) {
            Some(std::cmp::Ordering::Greater) => Slot::One(i),
            Some(std::cmp::Ordering::Equal) if n.node_id != best.node_id && matches!(self, Slot::One(_)) => {
                Slot::Tie(self.first(), i)
            }
            _ => self,
        }
    }
}

/// A snapshot's entries by node id; by hostname and by IP only once a Pod without the node-id annotation
/// needs them. Positions, not copies: an index costs a few bytes per entry however long the ids.
struct Index {
    snapshot: Arc<Snapshot>,
    hasher: foldhash::fast::RandomState,
    by_id: HashTable<Slot>,
    by_host: OnceCell<HashTable<Slot>>,
    by_ip: OnceCell<HashTable<(Box<str>, Slot)>>,
    /// Agents often advertise one address template (`ws://0.0.0.0:3001/…`): each is parsed once.
    addresses: RefCell<foldhash::HashMap<Box<str>, Option<url::Url>>>,
}

impl Index {
    fn new(snapshot: Arc<Snapshot>) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        let by_id = slots(&snapshot.nodes, &hasher, |n| Some(&*n.node_id));
        Index {
            snapshot,
            hasher,
            by_id,
            by_host: OnceCell::new(),
            by_ip: OnceCell::new(),
            addresses: Default::default(),
        }
    }

    fn node(&self, i: u32) -> &Node {
        &self.snapshot.nodes[i as usize]
    }

    fn by_id(&self, id: &str) -> Option<Slot> {
        self.by_id.find(self.hasher.hash_one(id), |s| &*self.node(s.first()).node_id == id).copied()
    }

    fn by_host(&self, host: &str) -> Option<Slot> {
        let table = self.by_host.get_or_init(|| slots(&self.snapshot.nodes, &self.hasher, |n| n.hostname.as_deref()));
        table.find(self.hasher.hash_one(host), |s| self.node(s.first()).hostname.as_deref() == Some(host)).copied()
    }

    fn by_ip(&self, ip: &str) -> Option<Slot> {
        let table = self.by_ip.get_or_init(|| {
            let mut t: HashTable<(Box<str>, Slot)> = HashTable::new();
            for (i, n) in self.snapshot.nodes.iter().enumerate() {
                let Some(ip) = address_host(&n.address) else { continue };
                let h = self.hasher.hash_one(ip.as_str());
                match t.entry(h, |(k, _)| **k == *ip, |(k, _)| self.hasher.hash_one(&**k)) {
                    hash_table::Entry::Occupied(mut e) => {
                        e.get_mut().1 = e.get().1.with(i as u32, &self.snapshot.nodes)
                    }
                    hash_table::Entry::Vacant(e) => _ = e.insert((ip.into(), Slot::One(i as u32))),
                }
            }
            t
        });
        table.find(self.hasher.hash_one(ip), |(k, _)| **k == *ip).map(|(_, s)| *s)
    }

    fn dial_url(&self, node: &Node, pod_ip: &str) -> Option<String> {
        let mut addresses = self.addresses.borrow_mut();
        let url = match addresses.get(&*node.address) {
            Some(url) => url.clone(),
            None => addresses.entry(node.address.clone()).or_insert_with(|| ws_url(&node.address)).clone(),
        };
        with_host(url?, pod_ip)
    }
}

/// `nodes` by the key `key` gives each (those without one left out), ties resolved as [`Slot`] says.
fn slots(
    nodes: &[Node],
    hasher: &foldhash::fast::RandomState,
    key: impl for<'n> Fn(&'n Node) -> Option<&'n str>,
) -> HashTable<Slot> {
    let mut table: HashTable<Slot> = HashTable::new();
    let key_of = |s: &Slot| key(&nodes[s.first() as usize]).unwrap_or_default();
    for (i, n) in nodes.iter().enumerate() {
        let Some(k) = key(n) else { continue };
        match table.entry(hasher.hash_one(k), |s| key_of(s) == k, |s| hasher.hash_one(key_of(s))) {
            hash_table::Entry::Occupied(mut e) => *e.get_mut() = e.get().with(i as u32, nodes),
            hash_table::Entry::Vacant(e) => _ = e.insert(Slot::One(i as u32)),
        }
    }
    table
}

fn candidate(
    pod: &CachedPod,
    index: &Index,
    rules: &Rules,
    node_domain: &dyn Fn(&str) -> Option<String>,
) -> Result<Agent, Exclusion> {
    if pod.terminating {
        return Err(Exclusion::Terminating);
    }
    if !pod.ready {
        return Err(Exclusion::NotReady);
    }
    let ip = pod.pod_ip.as_deref().ok_or(Exclusion::NoPodIp)?;
    let name = &pod.name;
    let found = match pod.annotation(rules.node_id_annotation) {
        Some(id) => index.by_id(id).map(|e| ("node id", e)),
        None => index.by_host(name).map(|e| ("hostname", e)).or_else(|| index.by_ip(ip).map(|e| ("IP", e))),
    };
    let node = match found.ok_or(Exclusion::NoPresence)? {
        (_, Slot::One(i)) => index.node(i),
        (by, Slot::Tie(a, b)) => {
            let node_ids = [index.node(a).node_id.to_string(), index.node(b).node_id.to_string()];
            return Err(Exclusion::AmbiguousPresence { by, node_ids });
        }
    };
    let snapshot = &index.snapshot;
    if snapshot.server_node_id.as_deref() == Some(&*node.node_id) {
        return Err(Exclusion::IsRendezvous);
    }
    if node.node_id.is_empty() || node.node_id.len() > MAX_NODE_ID_BYTES {
        return Err(Exclusion::BadNodeId(node.node_id.len()));
    }
    if !node.alive {
        return Err(Exclusion::NotAlive);
    }
    if node.address.is_empty() {
        return Err(Exclusion::NoAddress);
    }
    if !snapshot.is_live(node, rules.heartbeat_timeout, rules.fallback_now_ms) {
        return Err(Exclusion::StaleHeartbeat);
    }
    if node.address.len() > MAX_ADDRESS_BYTES {
        return Err(Exclusion::AddressTooLong(node.address.len()));
    }
    let url = index.dial_url(node, ip).ok_or_else(|| Exclusion::BadAddress(node.address.to_string()))?;
    // Percent-encoding can grow an address: the bound is on what lands in the annotations.
    if url.len() > MAX_ADDRESS_BYTES {
        return Err(Exclusion::AddressTooLong(url.len()));
    }
    let domain = rules
        .topology_key
        .and_then(|key| pod.labels().get(key).cloned().or_else(|| pod.node_name.as_deref().and_then(node_domain)));
    let (node_id, url, unreachable) = (Name::from(&*node.node_id), Name::from(url), node.unreachable.clone());
    Ok(Agent { pod: name.clone(), node_id, url, domain, unreachable })
}

/// The advertised URL with an unspecified host (`0.0.0.0`, `::`, `localhost`, empty) replaced by the Pod IP;
/// `None` unless it is a ws:// or wss:// URL.
pub fn dial_url(address: &str, pod_ip: &str) -> Option<String> {
    with_host(ws_url(address)?, pod_ip)
}

fn ws_url(address: &str) -> Option<url::Url> {
    let url = url::Url::parse(address).ok()?;
    matches!(url.scheme(), "ws" | "wss").then_some(url)
}

fn with_host(mut url: url::Url, pod_ip: &str) -> Option<String> {
    let unspecified = match url.host() {
        None => true,
        Some(url::Host::Domain(d)) => d.is_empty() || d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => ip.is_unspecified(),
    };
    if unspecified {
        let ip: std::net::IpAddr = pod_ip.parse().ok()?;
        url.set_ip_host(ip).ok()?;
    }
    Some(url.into())
}

/// The host of `address` when it is an IP literal.
pub fn address_host(address: &str) -> Option<String> {
    let url = url::Url::parse(address).ok()?;
    match url.host()? {
        url::Host::Ipv4(ip) => Some(ip.to_string()),
        url::Host::Ipv6(ip) => Some(ip.to_string()),
        url::Host::Domain(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, ready: bool, annotations: serde_json::Value) -> CachedPod {
        CachedPod::from_pod(
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": annotations, "labels": {"zone": "z1"}},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .unwrap(),
        )
    }

    fn node(id: &str, address: &str, hostname: Option<&str>, age_ms: f64) -> Node {
        Node {
            node_id: id.into(),
            address: address.into(),
            alive: true,
            last_seen_ms: Some(1_000_000.0 - age_ms),
            hostname: hostname.map(Into::into),
            unreachable: Default::default(),
        }
    }

    fn of_pods(
        pods: &[&CachedPod],
        snap: &Snapshot,
        rules: &Rules,
        node_domain: &dyn Fn(&str) -> Option<String>,
    ) -> Membership {
        let selected = pods.iter().map(|p| (p.name.clone(), Arc::new((*p).clone()))).collect();
        let o = Observed { selected, ..Default::default() };
        let mut verdicts = Verdicts::default();
        verdicts.update(&o, &Arc::new(snap.clone()), rules, node_domain, &Dirty::default());
        verdicts.members
    }

    fn rules() -> Rules<'static> {
        Rules {
            node_id_annotation: "agentmesh.dev/node-id",
            topology_key: Some("zone"),
            heartbeat_timeout: Duration::from_secs(60),
            fallback_now_ms: 0.0,
        }
    }

    #[test]
    fn matches_by_annotation_then_hostname_then_ip() {
        let snap = Snapshot {
            server_node_id: Some("rv".into()),
            now_ms: Some(1_000_000.0),
            nodes: vec![
                node("aa", "ws://0.0.0.0:3001/crdt-sync", None, 0.0),
                node("bb", "ws://0.0.0.0:3001/crdt-sync", Some("agent-b"), 0.0),
                node("cc", "ws://127.0.0.3:3001/crdt-sync", None, 0.0),
                node("rv", "ws://127.0.0.9:3001/crdt-sync", Some("agent-rv"), 0.0),
            ]
            .into(),
        };
        let pods = [
            pod("agent-a", "127.0.0.1", true, json!({"agentmesh.dev/node-id": "aa"})),
            pod("agent-b", "127.0.0.2", true, json!({})),
            pod("agent-c", "127.0.0.3", true, json!({})),
            pod("agent-rv", "127.0.0.9", true, json!({})),
            pod("agent-x", "127.0.0.4", false, json!({})),
        ];
        let refs: Vec<&CachedPod> = pods.iter().collect();
        let m = of_pods(&refs, &snap, &rules(), &|_| None);
        let got: Vec<(&str, &str, &str)> =
            m.agents.values().map(|a| (a.pod.as_str(), a.node_id.as_str(), a.url.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("agent-a", "aa", "ws://127.0.0.1:3001/crdt-sync"),
                ("agent-b", "bb", "ws://127.0.0.2:3001/crdt-sync"),
                ("agent-c", "cc", "ws://127.0.0.3:3001/crdt-sync"),
            ]
        );
        assert_eq!(m.agents["agent-a"].domain.as_deref(), Some("z1"));
        assert_eq!(m.excluded["agent-rv"], Exclusion::IsRendezvous);
        assert_eq!(m.excluded["agent-x"], Exclusion::NotReady);
    }

    #[test]
    fn duplicate_claims_exclude_both_and_name_them() {
        let snap = Snapshot {
            now_ms: Some(1_000_000.0),
            nodes: vec![node("aa", "ws://0.0.0.0:1/", None, 0.0)].into(),
            ..Default::default()
        };
        let pods = [
            pod("p1", "127.0.0.1", true, json!({"agentmesh.dev/node-id": "aa"})),
            pod("p2", "127.0.0.2", true, json!({"agentmesh.dev/node-id": "aa"})),
        ];
        let refs: Vec<&CachedPod> = pods.iter().collect();
        let m = of_pods(&refs, &snap, &rules(), &|_| None);
        assert!(m.agents.is_empty());
        let want = Exclusion::DuplicateNodeId { node_id: "aa".into(), pods: vec!["p1".into(), "p2".into()] };
        assert_eq!(m.excluded["p1"], want);
        assert_eq!(m.excluded["p2"], want);
    }

    /// An agent recreated with a new key under its old hostname: its dead entry, listed before or after
    /// the live one, never wins; two equally fresh live entries exclude the Pod and name both.
    #[test]
    fn entries_sharing_a_hostname_or_ip_resolve_to_the_freshest_alive_one() {
        let mut dead = node("old", "ws://127.0.0.2:1/", Some("agent-b"), 0.0);
        dead.alive = false;
        let live = node("new", "ws://127.0.0.2:1/", Some("agent-b"), 5_000.0);
        let pods = [pod("agent-b", "127.0.0.2", true, json!({})), pod("agent-c", "127.0.0.3", true, json!({}))];
        let refs: Vec<&CachedPod> = pods.iter().collect();
        for nodes in [vec![dead.clone(), live.clone()], vec![live.clone(), dead.clone()]] {
            let snap = Snapshot { now_ms: Some(1_000_000.0), nodes: nodes.into(), ..Default::default() };
            let m = of_pods(&refs, &snap, &rules(), &|_| None);
            assert_eq!(m.agents.values().map(|a| a.node_id.as_str()).collect::<Vec<_>>(), ["new"]);
        }
        // Of two live entries the later heartbeat wins; two that tie exclude the Pod, naming both.
        let older = node("older", "ws://127.0.0.3:1/", Some("agent-c"), 9_000.0);
        let newer = node("newer", "ws://127.0.0.3:1/", Some("agent-c"), 1_000.0);
        let twin = node("twin", "ws://127.0.0.3:1/", Some("agent-c"), 1_000.0);
        let snap = Snapshot {
            now_ms: Some(1_000_000.0),
            nodes: vec![older.clone(), newer.clone()].into(),
            ..Default::default()
        };
        assert_eq!(of_pods(&refs, &snap, &rules(), &|_| None).agents["agent-c"].node_id, "newer");
        let snap = Snapshot { now_ms: Some(1_000_000.0), nodes: vec![newer, older, twin].into(), ..Default::default() };
        let m = of_pods(&refs, &snap, &rules(), &|_| None);
        let want = Exclusion::AmbiguousPresence { by: "hostname", node_ids: ["newer".into(), "twin".into()] };
        assert_eq!(m.excluded["agent-c"], want);
        assert!(want.to_string().contains("newer") && want.to_string().contains("twin"));
        // By IP, for Pods whose hostname matches nothing.
        let by_ip = [node("x", "ws://127.0.0.7:1/", None, 0.0), node("y", "ws://127.0.0.7:1/", None, 0.0)];
        let snap = Snapshot { now_ms: Some(1_000_000.0), nodes: by_ip.to_vec().into(), ..Default::default() };
        let lone = [pod("agent-z", "127.0.0.7", true, json!({}))];
        let m = of_pods(&lone.iter().collect::<Vec<_>>(), &snap, &rules(), &|_| None);
        assert!(matches!(&m.excluded["agent-z"], Exclusion::AmbiguousPresence { by: "IP", .. }));
    }

    #[test]
    fn stale_dead_and_bad_addresses_are_excluded() {
        let mut dead = node("dd", "ws://0.0.0.0:1/", None, 0.0);
        dead.alive = false;
        let snap = Snapshot {
            now_ms: Some(1_000_000.0),
            nodes: vec![
                node("ss", "ws://0.0.0.0:1/", None, 61_000.0),
                dead,
                node("hh", "http://0.0.0.0:1/", None, 0.0),
            ]
            .into(),
            ..Default::default()
        };
        let pods = [
            pod("stale", "127.0.0.1", true, json!({"agentmesh.dev/node-id": "ss"})),
            pod("dead", "127.0.0.2", true, json!({"agentmesh.dev/node-id": "dd"})),
            pod("http", "127.0.0.3", true, json!({"agentmesh.dev/node-id": "hh"})),
            pod("unknown", "127.0.0.4", true, json!({"agentmesh.dev/node-id": "zz"})),
        ];
        let refs: Vec<&CachedPod> = pods.iter().collect();
        let m = of_pods(&refs, &snap, &rules(), &|_| None);
        assert!(m.agents.is_empty());
        assert_eq!(m.excluded["stale"], Exclusion::StaleHeartbeat);
        assert_eq!(m.excluded["dead"], Exclusion::NotAlive);
        assert!(matches!(m.excluded["http"], Exclusion::BadAddress(_)));
        assert_eq!(m.excluded["unknown"], Exclusion::NoPresence);
    }

    #[test]
    fn hostile_ids_and_addresses_are_excluded_not_planned() {
        let snap = Snapshot {
            now_ms: Some(1_000_000.0),
            nodes: vec![
                node("", "ws://0.0.0.0:1/", Some("empty"), 0.0),
                node(&"x".repeat(300), "ws://0.0.0.0:1/", Some("long-id"), 0.0),
                node("ok", &format!("ws://0.0.0.0:1/{}", "a".repeat(300_000)), Some("long-address"), 0.0),
            ]
            .into(),
            ..Default::default()
        };
        let pods = [
            pod("empty", "127.0.0.1", true, json!({})),
            pod("long-id", "127.0.0.2", true, json!({})),
            pod("long-address", "127.0.0.3", true, json!({})),
        ];
        let refs: Vec<&CachedPod> = pods.iter().collect();
        let m = of_pods(&refs, &snap, &rules(), &|_| None);
        assert!(m.agents.is_empty());
        assert_eq!(m.excluded["empty"], Exclusion::BadNodeId(0));
        assert_eq!(m.excluded["long-id"], Exclusion::BadNodeId(300));
        assert!(m.excluded["long-address"].to_string().contains("300015 bytes"), "{}", m.excluded["long-address"]);
    }

    #[test]
    fn agents_of_another_policy_are_moved_out() {
        let nodes: Vec<Node> = ["1", "2", "3"].iter().map(|id| node(id, "ws://0.0.0.0:1/", None, 0.0)).collect();
        let snap = Arc::new(Snapshot { now_ms: Some(1_000_000.0), nodes: nodes.into(), ..Default::default() });
        let mut o = Observed::default();
        for (name, id) in [("a", "1"), ("b", "2"), ("c", "3")] {
            let p = pod(name, "127.0.0.1", true, json!({"agentmesh.dev/node-id": id}));
            o.selected.insert(name.into(), Arc::new(p));
        }
        o.foreign.insert("a", "other", vec![]);
        o.foreign.insert("x", "third", vec!["2".into()]);
        let mut verdicts = Verdicts::default();
        verdicts.update(&o, &snap, &rules(), &|_| None, &Dirty::default());
        let m = verdicts.membership();
        assert_eq!(m.agents.keys().map(Name::as_str).collect::<Vec<_>>(), ["c"]);
        assert_eq!(m.excluded["a"], Exclusion::OtherPolicy("other".into()));
        assert_eq!(m.excluded["b"], Exclusion::OtherPolicy("third".into()));
    }

    #[test]
    fn dial_url_rewrites_only_unspecified_hosts() {
        assert_eq!(dial_url("ws://0.0.0.0:3001/crdt-sync", "10.0.3.7").unwrap(), "ws://10.0.3.7:3001/crdt-sync");
        assert_eq!(dial_url("wss://[::]:3001/x", "127.0.0.5").unwrap(), "wss://127.0.0.5:3001/x");
        assert_eq!(dial_url("ws://localhost:3001/x", "::1").unwrap(), "ws://[::1]:3001/x");
        assert_eq!(dial_url("ws://agent-7.ci:3001/x", "10.0.0.1").unwrap(), "ws://agent-7.ci:3001/x");
        assert_eq!(dial_url("http://0.0.0.0:3001/x", "10.0.0.1"), None);
        assert_eq!(dial_url("not a url", "10.0.0.1"), None);
    }
}
