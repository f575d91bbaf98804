//! Link health: the pairs of agents the plan avoids because one reported it cannot reach the other. Pure.
//!
//! An agent lists in its presence entry the planned peers every dial to which has failed past its grace
//! period (`agent_mesh::health`). A report counts only for a peer the reporter's Pod carries as one it
//! dials: an agent can make the plan avoid only its own links, which it could drop anyway by not dialing.
//! A counted report makes the pair unusable for the policy's back-off. An agent withdraws its report once
//! its plan no longer holds the peer; reported again after that (the pair came back and failed again), the
//! back-off doubles, up to 64 times. A report never withdrawn (the write dropping the pair did not land,
//! or presence is frozen by an outage) keeps the pair avoided without doubling. A pair forgotten a whole
//! back-off after it could return, or once an end is no agent, starts afresh. At most a tenth of the
//! plan's links are avoided at once: reports beyond that are counted, not followed, so a rendezvous that
//! lists every link cannot make the operator rewire the whole mesh.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

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
    /// Whether the report was withdrawn since the pair was last avoided.
    withdrawn: bool,
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
    /// Reported pairs not avoided because a tenth of the links already are.
    pub over_limit: usize,
    /// When the first avoided pair may return to the plan.
    pub recheck: Option<Duration>,
}

/// The policy's back-off and cap, as the step reads them.
pub struct Rules {
    pub backoff: Duration,
    pub max_peers: u32,
}

impl LinkHealth {
    /// Takes the reports of `m`'s agents about the peers their Pods carry (`carried`), at `now` (and
    /// `wall`, the same instant on the wall clock, for the status).
    pub fn update(
        &mut self,
        m: &Membership,
        carried: &BTreeMap<String, Arc<Assignment>>,
        rules: &Rules,
        (now, wall): (Instant, &Time),
    ) -> Health {
        self.forget(m, now);
        let reported = reports(m, carried);
        let keys: BTreeSet<(&str, &str)> = reported.iter().map(|r| r.key()).collect();
        for ((a, b), e) in &mut self.pairs {
            e.withdrawn |= !keys.contains(&(a.as_str(), b.as_str()));
        }
        let limit = (m.agents.len() * rules.max_peers as usize / 20).max(1);
        let mut over_limit = 0;
        for r in &reported {
            let (a, b) = r.key();
            let key = (a.to_owned(), b.to_owned());
            let failures = match self.pairs.get(&key) {
                Some(e) if e.until > now => continue,
                Some(e) if !e.withdrawn => e.link.failures,
                Some(e) => e.link.failures + 1,
                None if self.avoided(now) >= limit => {
                    over_limit += 1;
                    continue;
                }
                None => 1,
            };
            let backoff = rules.backoff.saturating_mul(1 << (failures - 1).min(MAX_DOUBLINGS));
            let retry_after = whole_seconds(wall, backoff);
            let link = UnusableLink { reported_by: r.by.clone(), peer: r.peer.clone(), failures, retry_after };
            self.pairs.insert(key, Avoided { link, until: now + backoff, backoff, withdrawn: false });
        }
        self.health(reported, over_limit, now)
    }

    /// Drops the pairs a whole back-off past their end, and those an end of which is no agent.
    fn forget(&mut self, m: &Membership, now: Instant) {
        if self.pairs.is_empty() {
            return;
        }
        let ids: HashSet<&str> = m.agents.values().map(|a| &*a.node_id).collect();
        self.pairs.retain(|(a, b), e| e.until + e.backoff > now && ids.contains(&**a) && ids.contains(&**b));
    }

    fn avoided(&self, now: Instant) -> usize {
        self.pairs.values().filter(|e| e.until > now).count()
    }

    fn health(&self, reported: Vec<Report>, over_limit: usize, now: Instant) -> Health {
        let avoided: Vec<(&(String, String), &Avoided)> = self.pairs.iter().filter(|(_, e)| e.until > now).collect();
        let mut listed: Vec<UnusableLink> = avoided.iter().map(|(_, e)| e.link.clone()).collect();
        listed.sort_by(|x, y| (&x.reported_by, &x.peer).cmp(&(&y.reported_by, &y.peer)));
        listed.truncate(LISTED);
        let mut pods: Vec<(String, String)> = reported.into_iter().map(|r| (r.by, r.peer)).collect();
        pods.sort();
        Health {
            unusable: avoided.iter().map(|(k, _)| (*k).clone()).collect(),
            reported: pods,
            listed,
            total: avoided.len(),
            over_limit,
            recheck: avoided.iter().map(|(_, e)| e.until - now).min(),
        }
    }
}

/// `wall` plus `by`, to the second: the status shows it, and the API server keeps whole seconds, so a
/// finer time would read back different and make every reconcile write the status again.
fn whole_seconds(wall: &Time, by: Duration) -> Time {
    let at = wall.0.checked_add(by).unwrap_or(Timestamp::MAX);
    Time(Timestamp::from_second(at.as_second()).unwrap_or(at))
}

/// A counted report: reporter and peer, by node id and by Pod.
struct Report {
    from: String,
    to: String,
    by: String,
    peer: String,
}

impl Report {
    /// The pair's node ids, the smaller first.
    fn key(&self) -> (&str, &str) {
        if self.from < self.to { (&self.from, &self.to) } else { (&self.to, &self.from) }
    }
}

/// Every counted report.
fn reports(m: &Membership, carried: &BTreeMap<String, Arc<Assignment>>) -> Vec<Report> {
    let reporters: Vec<_> = m.agents.values().filter(|a| !a.unreachable.is_empty()).collect();
    if reporters.is_empty() {
        return Vec::new();
    }
    let pod_of: foldhash::HashMap<&str, &str> = m.agents.values().map(|a| (&*a.node_id, &*a.pod)).collect();
    let mut out = Vec::new();
    for a in reporters {
        let Some(dials) = carried.get(&a.pod) else { continue };
        for id in a.unreachable.ids().filter(|id| dials.peers.iter().any(|p| p.node_id == *id)) {
            if let Some(peer) = pod_of.get(id) {
                out.push(Report {
                    from: a.node_id.clone(),
                    to: id.to_owned(),
                    by: a.pod.clone(),
                    peer: peer.to_string(),
                });
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

    const BACKOFF: Duration = Duration::from_secs(10);
    const RULES: Rules = Rules { backoff: BACKOFF, max_peers: 20 };

    fn fleet(reports: &[(usize, usize)]) -> Membership {
        let mut m = Membership::default();
        for i in 0..4 {
            let unreachable = reports.iter().filter(|(a, _)| *a == i).map(|(_, b)| format!("n{b}")).collect::<Vec<_>>();
            let unreachable = unreachable.iter().map(String::as_str).collect();
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

    fn wall(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn a_report_about_a_carried_peer_avoids_the_pair_with_a_growing_backoff() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        let c = carried();
        let first = h.update(&fleet(&[(0, 1)]), &c, &RULES, (t0, &wall(1000)));
        assert_eq!(first.unusable, Unusable::from([pair(0, 1)]));
        assert_eq!(first.reported, [("p0".to_string(), "p1".to_string())]);
        assert_eq!((first.listed[0].failures, first.total, first.recheck), (1, 1, Some(BACKOFF)));
        assert_eq!(first.listed[0].retry_after, wall(1010));
        // Reported again before the back-off ends (the write has not landed yet): nothing moves.
        let again = h.update(&fleet(&[(0, 1)]), &c, &RULES, (t0 + BACKOFF / 2, &wall(1005)));
        assert_eq!((again.listed[0].failures, again.recheck), (1, Some(BACKOFF / 2)));
        // The agent's plan dropped the peer: it withdraws the report; the back-off ends.
        let t1 = t0 + BACKOFF;
        let quiet = h.update(&fleet(&[]), &c, &RULES, (t1, &wall(1010)));
        assert_eq!((quiet.unusable.len(), quiet.total), (0, 0), "usable again");
        // Back in the plan and failing again: twice as long.
        let second = h.update(&fleet(&[(0, 1)]), &c, &RULES, (t1 + BACKOFF / 2, &wall(1015)));
        assert_eq!((second.listed[0].failures, second.recheck), (2, Some(2 * BACKOFF)));
        // Quiet for a whole back-off after it could return: forgotten, and a new failure starts afresh.
        let t2 = t1 + BACKOFF / 2 + 2 * BACKOFF;
        h.update(&fleet(&[]), &c, &RULES, (t2 + 2 * BACKOFF, &wall(0)));
        let fresh = h.update(&fleet(&[(0, 1)]), &c, &RULES, (t2 + 2 * BACKOFF, &wall(0)));
        assert_eq!(fresh.listed[0].failures, 1);
    }

    /// A report that was never withdrawn (the write dropping the pair failed, or presence is frozen) is
    /// the old failure, not a new one: the pair stays avoided at the same back-off.
    #[test]
    fn a_report_never_withdrawn_keeps_the_pair_avoided_without_doubling() {
        let t0 = Instant::now();
        let (mut h, c) = (LinkHealth::default(), carried());
        h.update(&fleet(&[(0, 1)]), &c, &RULES, (t0, &wall(0)));
        for round in 1..4 {
            let r = h.update(&fleet(&[(0, 1)]), &c, &RULES, (t0 + BACKOFF * round, &wall(0)));
            assert_eq!((r.listed[0].failures, r.recheck, r.total), (1, Some(BACKOFF), 1), "round {round}");
        }
    }

    #[test]
    fn reports_count_only_for_peers_the_reporter_dials_and_that_are_agents() {
        let now = Instant::now();
        let mut m = fleet(&[(0, 3), (2, 0)]);
        // p0 dials n1 and n2, not n3; p2 dials n3 and n0; a stranger's id is nobody's.
        let reporter = m.agents.get_mut("p1").unwrap();
        Arc::make_mut(reporter).unreachable = ["nobody"].into_iter().collect();
        let h = LinkHealth::default().update(&m, &carried(), &RULES, (now, &wall(0)));
        assert_eq!(h.unusable, Unusable::from([pair(2, 0)]));
        let none = LinkHealth::default().update(&m, &BTreeMap::new(), &RULES, (now, &wall(0)));
        assert_eq!(none, Health::default(), "a Pod carrying nothing reports nothing");
        // An end that leaves the fleet takes its pairs with it.
        let mut h = LinkHealth::default();
        h.update(&m, &carried(), &RULES, (now, &wall(0)));
        let mut gone = fleet(&[]);
        gone.agents.remove("p2");
        assert_eq!(h.update(&gone, &carried(), &RULES, (now, &wall(0))).total, 0);
    }

    #[test]
    fn the_backoff_stops_doubling_and_the_avoided_pairs_are_bounded() {
        let t0 = Instant::now();
        let (mut h, c) = (LinkHealth::default(), carried());
        let mut t = t0;
        for round in 1..=9 {
            let r = h.update(&fleet(&[(0, 1)]), &c, &RULES, (t, &wall(0)));
            let doublings = (round - 1).min(MAX_DOUBLINGS);
            assert_eq!(r.recheck, Some(BACKOFF * (1 << doublings)), "round {round}");
            t += BACKOFF * (1 << doublings);
            h.update(&fleet(&[]), &c, &RULES, (t, &wall(0)));
        }
        let every = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 0), (3, 0), (3, 1)];
        let all = LinkHealth::default().update(&fleet(&every), &c, &RULES, (t0, &wall(0)));
        assert_eq!((all.total, all.listed.len(), all.over_limit), (4, 4, 2), "6 pairs reported, at most 4 avoided");
        assert!(all.listed.windows(2).all(|w| (&w[0].reported_by, &w[0].peer) < (&w[1].reported_by, &w[1].peer)));
    }

    /// The status shows whole seconds: what it reads back is what was written, so it is not written again.
    #[test]
    fn retry_times_are_whole_seconds() {
        let now = Time(Timestamp::from_second(1000).unwrap().checked_add(Duration::from_millis(1234)).unwrap());
        let h = LinkHealth::default().update(&fleet(&[(0, 1)]), &carried(), &RULES, (Instant::now(), &now));
        assert_eq!(h.listed[0].retry_after, wall(1011));
        let text = serde_json::to_string(&h.listed[0]).unwrap();
        assert_eq!(serde_json::from_str::<UnusableLink>(&text).unwrap(), h.listed[0]);
    }
}
