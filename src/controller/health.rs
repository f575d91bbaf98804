//! Link health: the pairs of agents the plan avoids because one reported it cannot reach the other. Pure.
//!
//! An agent lists in its presence entry the planned peers every dial to which has failed past its grace
//! period (`agent_mesh::health`). A report counts only for a peer the reporter's Pod carries as one it
//! dials: an agent can make the plan avoid only its own links, which it could drop anyway by not dialing.
//! A counted report makes the pair unusable for the policy's back-off. When the back-off ends the pair
//! may return to the plan; reported again, its back-off doubles (up to 64 times). A pair not reported
//! for a whole back-off after it could return is forgotten, so a healed pair starts afresh.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::membership::Membership;
use crate::api::UnusableLink;
use crate::assignment::Assignment;
use crate::planner::Unusable;

/// How many avoided pairs the status lists.
pub const LISTED: usize = 20;
/// The back-off doubles at most this many times.
const MAX_DOUBLINGS: u32 = 6;

/// What the step keeps between reconciles: every pair avoided now or lately, by node ids (smaller first).
#[derive(Default)]
pub struct LinkHealth {
    pairs: BTreeMap<(String, String), Avoided>,
}

struct Avoided {
    link: UnusableLink,
    /// When the plan may hold the pair again.
    until: Instant,
    backoff: Duration,
}

/// What the plan and the status read of link health after one reconcile.
#[derive(Debug, Default, PartialEq)]
pub struct Health {
    /// The pairs the plan must not hold now.
    pub unusable: Unusable,
    /// Links the Pods carry that an agent reports it cannot open: (reporter Pod, peer Pod), sorted.
    pub reported: Vec<(String, String)>,
    /// The pairs avoided now, the first [`LISTED`] by reporter and peer.
    pub listed: Vec<UnusableLink>,
    pub total: usize,
    /// When the first avoided pair may return to the plan.
    pub recheck: Option<Duration>,
}

impl LinkHealth {
    /// Takes the reports of `m`'s agents about the peers their Pods carry (`carried`), at `now` (and
    /// `wall`, the same instant on the wall clock, for the status).
    pub fn update(
        &mut self,
        m: &Membership,
        carried: &BTreeMap<String, Arc<Assignment>>,
        backoff: Duration,
        (now, wall): (Instant, &Time),
    ) -> Health {
        let reported = reports(m, carried);
        for (a, b, by, peer) in &reported {
            let key = if a < b { (a.clone(), b.clone()) } else { (b.clone(), a.clone()) };
            let failures = match self.pairs.get(&key) {
                Some(e) if e.until > now => continue,
                Some(e) => e.link.failures + 1,
                None => 1,
            };
            let backoff = backoff.saturating_mul(1 << (failures - 1).min(MAX_DOUBLINGS));
            let retry_after = Time(wall.0 + backoff);
            let link = UnusableLink { reported_by: by.clone(), peer: peer.clone(), failures, retry_after };
            self.pairs.insert(key, Avoided { link, until: now + backoff, backoff });
        }
        self.pairs.retain(|_, e| e.until + e.backoff > now);
        let avoided: BTreeMap<(&str, &str), &Avoided> = self
            .pairs
            .values()
            .filter(|e| e.until > now)
            .map(|e| ((e.link.reported_by.as_str(), e.link.peer.as_str()), e))
            .collect();
        let mut reported: Vec<(String, String)> = reported.into_iter().map(|(_, _, by, peer)| (by, peer)).collect();
        reported.sort();
        Health {
            unusable: self.pairs.iter().filter(|(_, e)| e.until > now).map(|(k, _)| k.clone()).collect(),
            reported,
            listed: avoided.values().take(LISTED).map(|e| e.link.clone()).collect(),
            total: avoided.len(),
            recheck: avoided.values().map(|e| e.until - now).min(),
        }
    }
}

/// Every counted report: (reporter node id, peer node id, reporter Pod, peer Pod).
fn reports(m: &Membership, carried: &BTreeMap<String, Arc<Assignment>>) -> Vec<(String, String, String, String)> {
    let reporters: Vec<_> = m.agents.values().filter(|a| !a.unreachable.is_empty()).collect();
    if reporters.is_empty() {
        return Vec::new();
    }
    let pod_of: foldhash::HashMap<&str, &str> = m.agents.values().map(|a| (&*a.node_id, &*a.pod)).collect();
    let mut out = Vec::new();
    for a in reporters {
        let Some(dials) = carried.get(&a.pod) else { continue };
        for id in a.unreachable.iter().filter(|id| dials.peers.iter().any(|p| p.node_id == ***id)) {
            if let Some(peer) = pod_of.get(&**id) {
                out.push((a.node_id.clone(), id.to_string(), a.pod.clone(), peer.to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::Peer;
    use crate::controller::membership::Agent;
    use k8s_openapi::jiff::Timestamp;

    const BACKOFF: Duration = Duration::from_secs(10);

    fn fleet(reports: &[(usize, usize)]) -> Membership {
        let mut m = Membership::default();
        for i in 0..4 {
            let unreachable = reports.iter().filter(|(a, _)| *a == i).map(|(_, b)| format!("n{b}").into()).collect();
            let (pod, node_id, url) = (format!("p{i}"), format!("n{i}"), format!("ws://10.0.0.{i}:1/"));
            m.agents.insert(pod.clone(), Arc::new(Agent { pod, node_id, url, domain: None, unreachable }));
        }
        m
    }

    /// Each Pod dials the next two (mod 4).
    fn carried() -> BTreeMap<String, Arc<Assignment>> {
        (0..4)
            .map(|i| {
                let peer = |j: usize| Peer { node_id: format!("n{}", (i + j) % 4), url: String::new() };
                (format!("p{i}"), Arc::new(Assignment::new(vec![peer(1), peer(2)], [], "mesh".into())))
            })
            .collect()
    }

    fn pair(a: usize, b: usize) -> (String, String) {
        (format!("n{}", a.min(b)), format!("n{}", a.max(b)))
    }

    #[test]
    fn a_report_about_a_carried_peer_avoids_the_pair_with_a_growing_backoff() {
        let (t0, wall) = (Instant::now(), Time(Timestamp::from_second(1000).unwrap()));
        let mut h = LinkHealth::default();
        let c = carried();
        let first = h.update(&fleet(&[(0, 1)]), &c, BACKOFF, (t0, &wall));
        assert_eq!(first.unusable, Unusable::from([pair(0, 1)]));
        assert_eq!(first.reported, [("p0".to_string(), "p1".to_string())]);
        assert_eq!((first.listed[0].failures, first.total, first.recheck), (1, 1, Some(BACKOFF)));
        assert_eq!(first.listed[0].retry_after, Time(Timestamp::from_second(1010).unwrap()));
        // Reported again before the back-off ends (the write has not landed yet): nothing moves.
        let again = h.update(&fleet(&[(0, 1)]), &c, BACKOFF, (t0 + BACKOFF / 2, &wall));
        assert_eq!((again.listed[0].failures, again.recheck), (1, Some(BACKOFF / 2)));
        // Back in the plan after the back-off and failing again: twice as long.
        let t1 = t0 + BACKOFF;
        let quiet = h.update(&fleet(&[]), &c, BACKOFF, (t1, &wall));
        assert_eq!((quiet.unusable.len(), quiet.total), (0, 0), "usable again");
        let second = h.update(&fleet(&[(0, 1)]), &c, BACKOFF, (t1 + BACKOFF / 2, &wall));
        assert_eq!((second.listed[0].failures, second.recheck), (2, Some(2 * BACKOFF)));
        // Quiet for a whole back-off after it could return: forgotten, and a new failure starts afresh.
        let t2 = t1 + BACKOFF / 2 + 2 * BACKOFF;
        h.update(&fleet(&[]), &c, BACKOFF, (t2 + 2 * BACKOFF, &wall));
        let fresh = h.update(&fleet(&[(0, 1)]), &c, BACKOFF, (t2 + 2 * BACKOFF, &wall));
        assert_eq!(fresh.listed[0].failures, 1);
    }

    #[test]
    fn reports_count_only_for_peers_the_reporter_dials_and_that_are_agents() {
        let (now, wall) = (Instant::now(), Time(Timestamp::from_second(0).unwrap()));
        let mut m = fleet(&[(0, 3), (2, 0)]);
        // p0 dials n1 and n2, not n3; p2 dials n3 and n0; a stranger's id is nobody's.
        let reporter = m.agents.get_mut("p1").unwrap();
        Arc::make_mut(reporter).unreachable = ["nobody".into()].into();
        let h = LinkHealth::default().update(&m, &carried(), BACKOFF, (now, &wall));
        assert_eq!(h.unusable, Unusable::from([pair(2, 0)]));
        let none = LinkHealth::default().update(&m, &BTreeMap::new(), BACKOFF, (now, &wall));
        assert_eq!(none, Health::default(), "a Pod carrying nothing reports nothing");
    }

    #[test]
    fn the_backoff_stops_doubling_and_the_list_is_bounded() {
        let (t0, wall) = (Instant::now(), Time(Timestamp::from_second(0).unwrap()));
        let mut h = LinkHealth::default();
        let mut t = t0;
        for round in 1..=9 {
            let r = h.update(&fleet(&[(0, 1)]), &carried(), BACKOFF, (t, &wall));
            let doublings = (round - 1).min(MAX_DOUBLINGS);
            assert_eq!(r.recheck, Some(BACKOFF * (1 << doublings)), "round {round}");
            t += BACKOFF * (1 << doublings);
        }
        let m = fleet(&[(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 0), (3, 0), (3, 1)]);
        let all = LinkHealth::default().update(&m, &carried(), BACKOFF, (t0, &wall));
        assert_eq!((all.total, all.listed.len()), (6, 6), "8 reports of 6 pairs");
        assert!(all.listed.windows(2).all(|w| (&w[0].reported_by, &w[0].peer) < (&w[1].reported_by, &w[1].peer)));
    }
}
