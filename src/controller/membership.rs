//! Membership (docs/design.md §3.3): which selected Pods are eligible agents, matched to which presence entry, and
//! at which URL their peers dial them. Pure: Pods and a snapshot in, a verdict per Pod out.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kube::ResourceExt;

use super::observe::Observed;
use super::pods::CachedPod;
use super::policy::ValidPolicy;

use crate::presence::{Node, Snapshot};

/// Longest node id accepted: an Ed25519 key in hex is 64 bytes. Together with [`MAX_ADDRESS_BYTES`] this
/// keeps an agent's annotations (at most 64 peers) well under the API server's 256 KiB limit.
pub const MAX_NODE_ID_BYTES: usize = 256;
/// Longest advertised address accepted.
pub const MAX_ADDRESS_BYTES: usize = 2048;

/// An eligible agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    pub pod: String,
    pub node_id: String,
    /// Where peers dial this agent: the advertised URL with an unspecified host replaced by the Pod IP.
    pub url: String,
    pub domain: Option<String>,
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
    /// Eligible agents, sorted by Pod name.
    pub agents: Vec<Agent>,
    /// Every selected Pod that is not an agent, with the reason.
    pub excluded: BTreeMap<String, Exclusion>,
}

pub struct Rules<'a> {
    pub node_id_annotation: &'a str,
    pub topology_key: Option<&'a str>,
    pub heartbeat_timeout: Duration,
    /// The snapshot's clock when it carries none of its own (the controller's clock at fetch time).
    pub fallback_now_ms: f64,
}

/// Moves out of `m` every agent whose Pod carries another policy's assignment (`foreign_pods`: Pod → that
/// policy) or whose node id another policy's Pods dial or accept (`foreign_ids`: node id → that policy):
/// two policies never share an agent, so neither can fill it past the cap while the other still links it.
pub fn exclude_foreign(
    m: &mut Membership,
    foreign_pods: &HashMap<String, String>,
    foreign_ids: &HashMap<String, String>,
) {
    let (kept, moved): (Vec<Agent>, Vec<Agent>) = std::mem::take(&mut m.agents)
        .into_iter()
        .partition(|a| !foreign_pods.contains_key(&a.pod) && !foreign_ids.contains_key(&a.node_id));
    m.agents = kept;
    for a in moved {
        let policy = foreign_pods.get(&a.pod).or_else(|| foreign_ids.get(&a.node_id)).cloned().unwrap_or_default();
        m.excluded.insert(a.pod, Exclusion::OtherPolicy(policy));
    }
}

/// The eligible agents of `policy` under `snap` judged on `confirmed_ms`, without those another policy
/// still holds. `node_domain` is a Node's `topologyKey` label.
pub fn of_policy(
    policy: &ValidPolicy,
    o: &Observed,
    snap: &Snapshot,
    confirmed_ms: f64,
    node_domain: &dyn Fn(&str) -> Option<String>,
) -> Membership {
    let rules = Rules {
        node_id_annotation: &policy.node_id_annotation,
        topology_key: policy.topology_key.as_deref(),
        heartbeat_timeout: policy.heartbeat_timeout,
        fallback_now_ms: confirmed_ms,
    };
    let selected: Vec<&CachedPod> = o.selected.iter().map(|p| p.as_ref()).collect();
    let mut m = of_pods(&selected, snap, &rules, node_domain);
    exclude_foreign(&mut m, &o.foreign_pods, &o.foreign_ids);
    m
}

/// Decides membership for `pods` (already selected by the policy). `node_domain` gives the `topologyKey`
/// label of a Node by name.
pub fn of_pods(
    pods: &[&CachedPod],
    snapshot: &Snapshot,
    rules: &Rules,
    node_domain: &dyn Fn(&str) -> Option<String>,
) -> Membership {
    // Only the keys some Pod looks up are indexed: a presence list can be far longer than the fleet.
    // Hostname and IP matching serve Pods without the node-id annotation.
    let mut wanted = Keys::default();
    for pod in pods {
        match pod.annotation(rules.node_id_annotation) {
            Some(id) => _ = wanted.ids.insert(id),
            None => {
                wanted.hosts.extend(pod.metadata.name.as_deref());
                wanted.ips.extend(pod.pod_ip.as_deref());
            }
        }
    }
    let nodes = snapshot.nodes.iter();
    let index = Index {
        by_id: pick(nodes.clone().map(|n| (&*n.node_id, n)).filter(|(id, _)| wanted.ids.contains(id))),
        by_host: match wanted.hosts.is_empty() {
            false => pick(
                nodes
                    .clone()
                    .filter_map(|n| Some((n.hostname.as_deref()?, n)))
                    .filter(|(h, _)| wanted.hosts.contains(h)),
            ),
            true => Default::default(),
        },
        by_ip: match wanted.ips.is_empty() {
            false => pick(nodes.filter_map(|n| {
                address_host(&n.address).filter(|ip| wanted.ips.contains(ip.as_str())).map(|ip| (ip, n))
            })),
            true => Default::default(),
        },
        addresses: Default::default(),
    };

    let mut out = Membership::default();
    let mut candidates: Vec<Agent> = Vec::new();
    for pod in pods {
        let name = pod.name_any();
        match candidate(pod, &index, snapshot, rules, node_domain) {
            Ok(agent) => candidates.push(agent),
            Err(why) => {
                out.excluded.insert(name, why);
            }
        }
    }
    // Two Pods claiming one node id: neither can be trusted to be the one presence describes.
    let mut claims: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for a in &candidates {
        claims.entry(a.node_id.as_str()).or_default().push(a.pod.as_str());
    }
    let duplicates: BTreeMap<String, Vec<String>> = claims
        .into_iter()
        .filter(|(_, pods)| pods.len() > 1)
        .map(|(id, pods)| (id.to_owned(), pods.into_iter().map(str::to_owned).collect()))
        .collect();
    for a in candidates {
        match duplicates.get(&a.node_id) {
            Some(pods) => {
                let mut pods = pods.clone();
                pods.sort();
                out.excluded.insert(a.pod.clone(), Exclusion::DuplicateNodeId { node_id: a.node_id.clone(), pods });
            }
            None => out.agents.push(a),
        }
    }
    out.agents.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// The presence entry for one key (node id, hostname or IP). Several can share a key: an agent
/// recreated with a new key under its old hostname leaves its dead entry behind until the rendezvous
/// forgets it. The rule: an alive entry beats a dead one, then the later heartbeat wins; two entries with
/// different node ids that tie on both are ambiguous, and a Pod matched by that key is excluded.
#[derive(Clone, Copy)]
enum Entry<'a> {
    One(&'a Node),
    Tie(&'a Node, &'a Node),
}

impl<'a> Entry<'a> {
    fn rank(n: &Node) -> (bool, f64) {
        (n.alive, n.heartbeat_ms().unwrap_or(f64::NEG_INFINITY))
    }

    fn with(self, n: &'a Node) -> Entry<'a> {
        let best = match self {
            Entry::One(b) | Entry::Tie(b, _) => b,
        };
        match Self::rank(n).partial_cmp(&Self::rank(best)) {
            Some(std::cmp::Ordering::Greater) => Entry::One(n),
            Some(std::cmp::Ordering::Equal) if n.node_id != best.node_id && matches!(self, Entry::One(_)) => {
                Entry::Tie(best, n)
            }
            _ => self,
        }
    }
}

fn pick<'a, K: std::hash::Hash + Eq>(entries: impl Iterator<Item = (K, &'a Node)>) -> foldhash::HashMap<K, Entry<'a>> {
    let mut by: foldhash::HashMap<K, Entry<'a>> = Default::default();
    for (key, node) in entries {
        by.entry(key).and_modify(|e| *e = e.with(node)).or_insert(Entry::One(node));
    }
    by
}

/// The presence keys the Pods look up.
#[derive(Default)]
struct Keys<'p> {
    ids: foldhash::HashSet<&'p str>,
    hosts: foldhash::HashSet<&'p str>,
    ips: foldhash::HashSet<&'p str>,
}

/// Presence entries by node id, hostname and IP, and each advertised address parsed once.
struct Index<'a> {
    by_id: foldhash::HashMap<&'a str, Entry<'a>>,
    by_host: foldhash::HashMap<&'a str, Entry<'a>>,
    by_ip: foldhash::HashMap<String, Entry<'a>>,
    /// Agents often advertise one address template (`ws://0.0.0.0:3001/…`): each is parsed once.
    addresses: std::cell::RefCell<foldhash::HashMap<&'a str, Option<url::Url>>>,
}

impl<'a> Index<'a> {
    fn dial_url(&self, node: &'a Node, pod_ip: &str) -> Option<String> {
        let url = self.addresses.borrow_mut().entry(&*node.address).or_insert_with(|| ws_url(&node.address)).clone();
        with_host(url?, pod_ip)
    }
}

fn candidate<'a>(
    pod: &CachedPod,
    index: &Index<'a>,
    snapshot: &Snapshot,
    rules: &Rules,
    node_domain: &dyn Fn(&str) -> Option<String>,
) -> Result<Agent, Exclusion> {
    if pod.terminating() {
        return Err(Exclusion::Terminating);
    }
    if !pod.ready {
        return Err(Exclusion::NotReady);
    }
    let ip = pod.pod_ip.as_deref().ok_or(Exclusion::NoPodIp)?;
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let annotated = pod.annotation(rules.node_id_annotation);
    let found = match annotated {
        Some(id) => index.by_id.get(id).map(|e| ("node id", *e)),
        None => index.by_host.get(name).map(|e| ("hostname", *e)).or_else(|| index.by_ip.get(ip).map(|e| ("IP", *e))),
    };
    let node: &'a Node = match found.ok_or(Exclusion::NoPresence)? {
        (_, Entry::One(node)) => node,
        (by, Entry::Tie(a, b)) => {
            return Err(Exclusion::AmbiguousPresence { by, node_ids: [a.node_id.to_string(), b.node_id.to_string()] });
        }
    };
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
    Ok(Agent { pod: name.to_owned(), node_id: node.node_id.to_string(), url, domain })
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
        }
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
            m.agents.iter().map(|a| (a.pod.as_str(), a.node_id.as_str(), a.url.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("agent-a", "aa", "ws://127.0.0.1:3001/crdt-sync"),
                ("agent-b", "bb", "ws://127.0.0.2:3001/crdt-sync"),
                ("agent-c", "cc", "ws://127.0.0.3:3001/crdt-sync"),
            ]
        );
        assert_eq!(m.agents[0].domain.as_deref(), Some("z1"));
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
            assert_eq!(m.agents.iter().map(|a| a.node_id.as_str()).collect::<Vec<_>>(), ["new"]);
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
        assert_eq!(of_pods(&refs, &snap, &rules(), &|_| None).agents[0].node_id, "newer");
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
        let agent =
            |pod: &str, id: &str| Agent { pod: pod.into(), node_id: id.into(), url: String::new(), domain: None };
        let mut m =
            Membership { agents: vec![agent("a", "1"), agent("b", "2"), agent("c", "3")], ..Default::default() };
        let pods = HashMap::from([("a".to_string(), "other".to_string())]);
        let ids = HashMap::from([("2".to_string(), "third".to_string())]);
        exclude_foreign(&mut m, &pods, &ids);
        assert_eq!(m.agents, vec![agent("c", "3")]);
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
