//! Plan: the assignment each Pod of a policy should carry. With presence, the planner's graph over the
//! eligible agents (each link on the dialer's `peers` and the other end's `accepts`); without any presence
//! (a replica that leads for the first time during a rendezvous outage), the assignments the Pods already
//! carry, minus the Pods that are gone (DESIGN §3.4 rule 2).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::decide::PodState;
use super::membership::{self, Membership};
use crate::assignment::{Assignment, Peer};
use crate::planner::{self, PlanError, analysis};

/// Pod → its target: an assignment, or `None` to remove ours.
pub type Targets = BTreeMap<String, Option<Assignment>>;

/// A plan in the form the controller publishes.
pub struct PlanOutcome {
    /// Taken by the decision (empty after).
    pub targets: Targets,
    pub links: u32,
    pub max_degree: u32,
    pub min_degree: u32,
    pub components: u32,
    pub hash: String,
}

/// Plans `m`'s agents with at most `cap` links each, seeded by `seed`; `carried` holds what each Pod
/// carries as this policy's (Pods carrying it that are no longer agents get `None`).
pub fn plan(
    m: &Membership,
    cap: u32,
    seed: &str,
    policy: &str,
    carried: &BTreeMap<String, Assignment>,
) -> Result<PlanOutcome, PlanError> {
    let members: Vec<planner::Member> =
        m.agents.iter().map(|a| planner::Member { node_id: a.node_id.clone(), domain: a.domain.clone() }).collect();
    let previous: planner::Assignment = m
        .agents
        .iter()
        .filter_map(|a| {
            Some((a.node_id.clone(), carried.get(&a.pod)?.peers.iter().map(|p| p.node_id.clone()).collect()))
        })
        .collect();
    let plan = planner::plan(&members, cap, seed, &previous)?;
    let url: HashMap<&str, &str> = m.agents.iter().map(|a| (a.node_id.as_str(), a.url.as_str())).collect();
    let mut accepts: HashMap<&str, Vec<String>> = HashMap::new();
    for (i, member) in members.iter().enumerate() {
        for id in plan.dial_ids(i) {
            accepts.entry(id).or_default().push(member.node_id.clone());
        }
    }
    let mut targets: Targets = carried.keys().map(|pod| (pod.clone(), None)).collect();
    for (i, agent) in m.agents.iter().enumerate() {
        let peers = plan.dial_ids(i).into_iter().map(|id| Peer { node_id: id.to_owned(), url: url[id].to_owned() });
        let acc = accepts.remove(agent.node_id.as_str()).unwrap_or_default();
        targets.insert(agent.pod.clone(), Some(Assignment::new(peers.collect(), acc, policy.to_owned())));
    }
    let adj = analysis::adjacency(&plan.dial_lists());
    let degrees = analysis::links(&adj);
    Ok(PlanOutcome {
        links: plan.graph().edge_count() as u32,
        max_degree: degrees.iter().copied().max().unwrap_or(0) as u32,
        min_degree: degrees.iter().copied().min().unwrap_or(0) as u32,
        components: analysis::component_sizes(&adj, &vec![false; members.len()]).len() as u32,
        hash: hash(&targets),
        targets,
    })
}

/// With no presence: each Pod in `staying` keeps what it carries, without the peers that are gone; every
/// other Pod carrying ours gets `None`, and so does one whose keys name no policy (nobody planned them) or
/// that carries more than `cap` links. A peer is gone when its node id is that of a Pod that does not stay
/// (its node-id annotation), or when its URL names an IP that no Pod of `live_ips` has.
pub fn adopt(
    carried: &BTreeMap<String, Assignment>,
    pods: &BTreeMap<String, PodState>,
    staying: &HashSet<String>,
    live_ips: &HashSet<String>,
    cap: u32,
) -> Targets {
    let planned = |pod: &str, a: &Assignment| {
        staying.contains(pod)
            && a.links() <= cap as usize
            && pods.get(pod).is_some_and(|p| p.keys.contains_key(crate::assignment::POLICY))
    };
    let mut gone: BTreeSet<&str> = carried
        .iter()
        .filter(|(pod, a)| !planned(pod, a))
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
            let target = planned(pod, a).then(|| {
                let peers = a.peers.iter().filter(|p| !gone.contains(p.node_id.as_str())).cloned().collect();
                let accepts = a.accepts.iter().filter(|id| !gone.contains(id.as_str())).cloned();
                Assignment::new(peers, accepts, a.policy.clone())
            });
            (pod.clone(), target)
        })
        .collect()
}

/// A short, stable digest of the targets, for `status.planHash`. Every field ends in a byte no field can
/// hold (0xff is never UTF-8), and each list in its length, so different targets hash differently.
pub fn hash(targets: &Targets) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut field = |bytes: &[u8]| {
        h.update(bytes);
        h.update(&[0xff]);
    };
    for (pod, t) in targets {
        field(pod.as_bytes());
        let Some(a) = t else {
            field(b"-");
            continue;
        };
        field(&a.peers.len().to_le_bytes());
        for p in &a.peers {
            field(p.node_id.as_bytes());
            field(p.url.as_bytes());
        }
        field(&a.accepts.len().to_le_bytes());
        for id in &a.accepts {
            field(id.as_bytes());
        }
        field(a.policy.as_bytes());
    }
    format!("{:016x}", h.digest())
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
        let m = Membership { agents: (0..9).map(agent).collect(), ..Default::default() };
        let carried = BTreeMap::from([("gone".to_string(), Assignment::default())]);
        let out = plan(&m, 4, "seed", "p", &carried).unwrap();
        assert_eq!(out.targets["gone"], None);
        let published: BTreeMap<String, Assignment> =
            m.agents.iter().map(|a| (a.node_id.clone(), out.targets[&a.pod].clone().unwrap())).collect();
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
            Assignment::new(peers.collect(), accepts.iter().map(|s| s.to_string()), "p".into())
        };
        let carried = BTreeMap::from([
            ("x".to_string(), a(&[("ny", "10.0.0.2"), ("nz", "10.0.0.3")], &["nw"])),
            ("y".to_string(), a(&[], &["nx"])),
            ("z".to_string(), a(&[], &["nx"])),
        ]);
        let state = |id: &str| PodState {
            node_id: Some(id.into()),
            keys: std::sync::Arc::new(BTreeMap::from([(crate::assignment::POLICY.to_string(), "p".to_string())])),
            ..Default::default()
        };
        let pods = BTreeMap::from([("x".into(), state("nx")), ("y".into(), state("ny")), ("z".into(), state("nz"))]);
        let staying = HashSet::from(["x".to_string(), "y".to_string()]);
        let live_ips = HashSet::from(["10.0.0.1".to_string(), "10.0.0.2".to_string(), "10.0.0.3".to_string()]);
        let t = adopt(&carried, &pods, &staying, &live_ips, 4);
        assert_eq!(t["x"], Some(a(&[("ny", "10.0.0.2")], &["nw"])), "z is gone; nw may only be unknown");
        assert_eq!(t["y"], Some(a(&[], &["nx"])));
        assert_eq!(t["z"], None);
        let fewer_ips = HashSet::from(["10.0.0.1".to_string()]);
        assert_eq!(adopt(&carried, &pods, &staying, &fewer_ips, 4)["x"], Some(a(&[], &["nw"])), "deleted Pods' IPs");
        assert_eq!(adopt(&carried, &pods, &staying, &live_ips, 2)["x"], None, "over the cap: nobody planned it");
        let mut stray = pods.clone();
        stray.get_mut("y").unwrap().keys = Default::default();
        assert_eq!(adopt(&carried, &stray, &staying, &live_ips, 4)["y"], None, "stray keys are not adopted");
    }
}
