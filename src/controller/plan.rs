//! Plan: the assignment each Pod of a policy should carry. With presence, the planner's graph over the
//! eligible agents (each link on the dialer's `peers` and the other end's `accepts`); without any presence
//! (a replica that leads for the first time during a rendezvous outage), the assignments the Pods already
//! carry, minus the Pods that are gone (docs/design.md §3.4 rule 2).
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use super::membership::{self, Agent, Membership};
use super::pods::PodState;
use crate::assignment::{Assignment, Peer};
use crate::planner::{self, PlanError, analysis};

/// Pod → its target (an assignment, or `None` to remove ours), for the Pods that do not carry it yet.
pub type Targets = BTreeMap<String, Option<Arc<Assignment>>>;

/// A plan in the form the controller publishes.
pub struct PlanOutcome {
    /// The targets of the Pods that do not carry theirs (taken by the decision: empty after).
    pub targets: Targets,
    /// Agents that already carry their target.
    pub settled: u32,
    pub links: u32,
    pub max_degree: u32,
    pub min_degree: u32,
    pub components: u32,
    /// A digest of every Pod's target, for `status.planHash`.
    pub hash: String,
}

/// What the Pods carry, read as the planner's previous plan without copying it.
struct Carried<'a>(foldhash::HashMap<&'a str, &'a Assignment>);

impl planner::Previous for Carried<'_> {
    fn links(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().flat_map(|(&a, carried)| carried.peers.iter().map(move |p| (a, p.node_id.as_str())))
    }

    fn knew(&self, node_id: &str) -> bool {
        self.0.contains_key(node_id)
    }
}

/// One agent's target, borrowed from the plan: its peers (node id, URL) and accepts, sorted, under the
/// policy's cap.
struct Target<'a> {
    peers: Vec<(&'a str, &'a str)>,
    accepts: Vec<&'a str>,
    cap: u32,
}

impl Target<'_> {
    fn is(&self, a: &Assignment, policy: &str) -> bool {
        a.policy == policy
            && a.max_peers == Some(self.cap as usize)
            && a.peers.iter().map(|p| (p.node_id.as_str(), p.url.as_str())).eq(self.peers.iter().copied())
            && a.accepts.iter().map(String::as_str).eq(self.accepts.iter().copied())
    }

    fn to_assignment(&self, policy: &str) -> Assignment {
        let peers = self.peers.iter().map(|&(id, url)| Peer { node_id: id.to_owned(), url: url.to_owned() });
        Assignment::new(peers.collect(), self.accepts.iter().map(|&id| id.to_owned()), policy.to_owned())
            .with_max_peers(self.cap as usize)
    }
}

/// Plans `m`'s agents but those `held` with at most `cap` links each, seeded by `seed`. `carried` holds
/// what each Pod carries as this policy's (Pods carrying it that are no longer agents get `None`), `pods`
/// what each carries exactly: only the targets that differ from it are built.
pub fn targets(
    m: &Membership,
    held: &BTreeSet<String>,
    cap: u32,
    seed: &str,
    policy: &str,
    carried: &BTreeMap<String, Arc<Assignment>>,
    pods: &BTreeMap<String, PodState>,
) -> Result<PlanOutcome, PlanError> {
    // Sorted by Pod name, as the map is.
    let agents: Vec<&Agent> = m.agents.iter().filter(|(pod, _)| !held.contains(*pod)).map(|(_, a)| &**a).collect();
    let members: Vec<planner::Member> =
        agents.iter().map(|a| planner::Member { node_id: a.node_id.clone(), domain: a.domain.clone() }).collect();
    let previous =
        Carried(agents.iter().filter_map(|a| Some((a.node_id.as_str(), carried.get(&a.pod)?.as_ref()))).collect());
    let plan = planner::plan(&members, cap, seed, &previous)?;
    let g = plan.graph();
    let id = |v: u32| agents[v as usize].node_id.as_str();
    let target = |i: usize| {
        let mut peers: Vec<(&str, &str)> =
            g.dialed(i as u32).map(|v| (id(v), agents[v as usize].url.as_str())).collect();
        let mut accepts: Vec<&str> = g.accepted(i as u32).map(id).collect();
        peers.sort_unstable();
        accepts.sort_unstable();
        Target { peers, accepts, cap }
    };
    let mut out = PlanOutcome {
        targets: Targets::new(),
        settled: 0,
        links: g.edge_count() as u32,
        max_degree: (0..g.len() as u32).map(|u| g.degree(u)).max().unwrap_or(0) as u32,
        min_degree: (0..g.len() as u32).map(|u| g.degree(u)).min().unwrap_or(0) as u32,
        components: analysis::component_sizes(&adjacency(g), &vec![false; g.len()]).len() as u32,
        hash: String::new(),
    };
    let mut digest = Digest::default();
    let mut gone = carried.keys().filter(|pod| agents.binary_search_by(|a| a.pod.cmp(pod)).is_err()).peekable();
    for (i, agent) in agents.iter().enumerate() {
        while let Some(pod) = gone.next_if(|pod| **pod < agent.pod) {
            digest.target(pod, None, policy);
            out.targets.insert(pod.clone(), None);
        }
        let t = target(i);
        digest.target(&agent.pod, Some(&t), policy);
        match pods.get(&agent.pod).and_then(|p| p.keys.exact()) {
            Some(now) if t.is(now, policy) => out.settled += 1,
            _ => {
                out.targets.insert(agent.pod.clone(), Some(Arc::new(t.to_assignment(policy))));
            }
        }
    }
    for pod in gone {
        digest.target(pod, None, policy);
        out.targets.insert(pod.clone(), None);
    }
    out.hash = digest.finish();
    Ok(out)
}

fn adjacency(g: &planner::Graph) -> Vec<Vec<u32>> {
    (0..g.len() as u32).map(|u| g.neighbors(u).to_vec()).collect()
}

/// With no presence: each Pod in `staying` keeps what it carries, without the peers that are gone, under
/// `cap`; every other Pod carrying ours gets `None`, and so does one whose keys name no policy (nobody
/// planned them) or that carries more than `cap` links. A peer is gone when its node id is that of a Pod that does not stay
/// (its node-id annotation), or when its URL names an IP that no Pod of `live_ips` has.
pub fn adopt(
    carried: &BTreeMap<String, Arc<Assignment>>,
    pods: &BTreeMap<String, PodState>,
    staying: &HashSet<String>,
    live_ips: &HashSet<String>,
    cap: u32,
) -> Targets {
    let planned = |pod: &str, a: &Assignment| {
        staying.contains(pod) && a.links() <= cap as usize && pods.get(pod).is_some_and(|p| p.keys.policy().is_some())
    };
    let mut gone: BTreeSet<&str> = carried
        .iter()
        .filter(|(pod, a)| !planned(pod, a.as_ref()))
        .map(|(pod, _)| pod)
        .filter_map(|pod| pods.get(pod)?.node_id.as_deref())
        .collect();
    for a in carried.values() {
        gone.extend(
            a.peers
                .iter()
                .filter(|p| membership::address_host(&p.url).is_some_and(|ip| !live_ips.contains(&ip)))
                .map(|p| p.node_id.as_str()),
        );
    }
    carried
        .iter()
        .map(|(pod, a)| {
            let target = planned(pod, a.as_ref()).then(|| {
                let peers = a.peers.iter().filter(|p| !gone.contains(p.node_id.as_str())).cloned().collect();
                let accepts = a.accepts.iter().filter(|id| !gone.contains(id.as_str())).cloned();
                Arc::new(Assignment::new(peers, accepts, a.policy.clone()).with_max_peers(cap as usize))
            });
            (pod.clone(), target)
        })
        .collect()
}

/// A short, stable digest of every Pod's target, for `status.planHash`, fed in Pod name order. Every field
/// ends in a byte no field can hold (0xff is never UTF-8), and each list in its length, so different
/// targets hash differently.
#[derive(Default)]
struct Digest(xxhash_rust::xxh3::Xxh3);

impl Digest {
    fn field(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
        self.0.update(&[0xff]);
    }

    fn target(&mut self, pod: &str, target: Option<&Target>, policy: &str) {
        self.field(pod.as_bytes());
        let Some(t) = target else {
            return self.field(b"-");
        };
        self.field(&t.peers.len().to_le_bytes());
        for (id, url) in &t.peers {
            self.field(id.as_bytes());
            self.field(url.as_bytes());
        }
        self.field(&t.accepts.len().to_le_bytes());
        for id in &t.accepts {
            self.field(id.as_bytes());
        }
        self.field(policy.as_bytes());
        self.field(&t.cap.to_le_bytes());
    }

    fn finish(&self) -> String {
        format!("{:016x}", self.0.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::membership::Agent;

    fn agent(i: usize) -> Agent {
        Agent { pod: format!("p{i}"), node_id: format!("n{i}"), url: format!("ws://10.0.0.{i}:1/"), domain: None }
    }

    #[test]
    fn every_link_is_on_one_dialer_and_the_other_end_accepts_it() {
        let m = Membership {
            agents: (0..9).map(|i| (format!("p{i}"), Arc::new(agent(i)))).collect(),
            ..Default::default()
        };
        let carried = BTreeMap::from([("gone".to_string(), Arc::new(Assignment::default()))]);
        let out = targets(&m, &BTreeSet::new(), 4, "seed", "p", &carried, &BTreeMap::new()).unwrap();
        assert_eq!(out.targets["gone"], None);
        let published: BTreeMap<String, Assignment> = m
            .agents
            .values()
            .map(|a| (a.node_id.clone(), Assignment::clone(out.targets[&a.pod].as_deref().unwrap())))
            .collect();
        assert_eq!(crate::assignment::first_violation(&published, 4), None);
        for (id, a) in &published {
            assert_eq!(a.links(), 4);
            for p in &a.peers {
                assert!(published[&p.node_id].accepts.contains(id), "{} accepts {id}", p.node_id);
            }
        }
    }

    #[test]
    fn adopting_keeps_what_stays_and_drops_what_is_gone() {
        let a = |peers: &[(&str, &str)], accepts: &[&str]| {
            let peers = peers.iter().map(|(id, ip)| Peer { node_id: id.to_string(), url: format!("ws://{ip}:1/") });
            Assignment::new(peers.collect(), accepts.iter().map(|s| s.to_string()), "p".into()).with_max_peers(4)
        };
        let carried = BTreeMap::from([
            ("x".to_string(), Arc::new(a(&[("ny", "10.0.0.2"), ("nz", "10.0.0.3")], &["nw"]))),
            ("y".to_string(), Arc::new(a(&[], &["nx"]))),
            ("z".to_string(), Arc::new(a(&[], &["nx"]))),
        ]);
        let state = |id: &str| PodState {
            node_id: Some(id.into()),
            keys: crate::controller::pods::Keys::new(BTreeMap::from([(
                crate::assignment::POLICY.to_string(),
                "p".to_string(),
            )])),
            ..Default::default()
        };
        let pods = BTreeMap::from([("x".into(), state("nx")), ("y".into(), state("ny")), ("z".into(), state("nz"))]);
        let staying = HashSet::from(["x".to_string(), "y".to_string()]);
        let live_ips = HashSet::from(["10.0.0.1".to_string(), "10.0.0.2".to_string(), "10.0.0.3".to_string()]);
        let t = adopt(&carried, &pods, &staying, &live_ips, 4);
        assert_eq!(t["x"].as_deref(), Some(&a(&[("ny", "10.0.0.2")], &["nw"])), "z is gone; nw may only be unknown");
        assert_eq!(t["y"].as_deref(), Some(&a(&[], &["nx"])));
        assert_eq!(t["z"], None);
        let fewer_ips = HashSet::from(["10.0.0.1".to_string()]);
        assert_eq!(
            adopt(&carried, &pods, &staying, &fewer_ips, 4)["x"].as_deref(),
            Some(&a(&[], &["nw"])),
            "deleted Pods' IPs"
        );
        assert_eq!(adopt(&carried, &pods, &staying, &live_ips, 2)["x"], None, "over the cap: nobody planned it");
        let lowered = adopt(&carried, &pods, &staying, &live_ips, 2);
        assert_eq!(
            lowered["y"].as_deref(),
            Some(&a(&[], &[]).with_max_peers(2)),
            "x released; y kept under the new cap"
        );
        let mut stray = pods.clone();
        stray.get_mut("y").unwrap().keys = Default::default();
        assert_eq!(adopt(&carried, &stray, &staying, &live_ips, 4)["y"], None, "stray keys are not adopted");
    }
}
