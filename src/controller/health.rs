//! Link health: the pairs of agents the plan avoids because one reported it cannot reach the other. Pure.
//!
//! An agent lists in its presence entry the planned peers every dial to which has failed past its grace
//! period (`agent_mesh::health`). A report counts only for a peer the reporter's Pod carries as one it
//! dials: an agent can make the plan avoid only its own links, which it could drop anyway by not dialing.
//! A counted report makes the pair unusable for the policy's back-off, and for as long after as the agent
//! still lists the peer (presence frozen by an outage, a write that did not land): only a report
//! withdrawn and made again is a new failure. An agent withdraws its report once its plan no longer holds
//! the peer; reported again after that (the pair came back and failed again), the back-off doubles, up to
//! 64 times. A pair forgotten a whole back-off after it could return, or once an end is no agent, starts
//! afresh. At most a tenth of the links are avoided at once: reports beyond that are counted, not
//! followed, so a rendezvous that lists every link cannot make the operator rewire the whole mesh.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::membership::Membership;
use crate::api::UnusableLink;
use crate::assignment::{Assignment, Name};
use crate::planner::{self, Unusable};

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
    /// Whether the agent stopped listing the peer since the pair was last avoided.
    withdrawn: bool,
}

impl Avoided {
    fn avoids(&self, now: Instant) -> bool {
        self.until > now || !self.withdrawn
    }
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
        carried: &BTreeMap<Name, Arc<Assignment>>,
        rules: &Rules,
        (now, wall): (Instant, &Time),
    ) -> Health {
        self.forget(m, now);
        let Reports { listed, counted } = reports(m, carried);
        for (key, e) in &mut self.pairs {
            e.withdrawn |= !listed.contains(key);
        }
        // A tenth of the links: N·k/2 of them, k no more than N − 1.
        let k = (rules.max_peers as usize).min(m.agents.len().saturating_sub(1));
        let limit = (m.agents.len() * k / 20).max(1);
        let mut avoided = self.pairs.values().filter(|e| e.avoids(now)).count();
        let mut over_limit = 0;
        for r in &counted {
            let failures = match self.pairs.get(&r.key) {
                Some(e) if e.avoids(now) => continue,
                _ if avoided >= limit => {
                    over_limit += 1;
                    continue;
                }
                Some(e) => e.link.failures + 1,
                None => 1,
            };
            let backoff = rules.backoff.saturating_mul(1 << (failures - 1).min(MAX_DOUBLINGS));
            let retry_after = whole_seconds(wall, backoff);
            let link = UnusableLink { reported_by: r.by.clone(), peer: r.peer.clone(), failures, retry_after };
            self.pairs.insert(r.key.clone(), Avoided { link, until: now + backoff, backoff, withdrawn: false });
            avoided += 1;
        }
        self.health(counted, over_limit, now)
    }

    /// Drops the pairs a whole back-off past their end whose report was withdrawn, and those an end of
    /// which is no agent.
    fn forget(&mut self, m: &Membership, now: Instant) {
        if self.pairs.is_empty() {
            return;
        }
        let ids: HashSet<&str> = m.agents.values().map(|a| &*a.node_id).collect();
        let agents = |(a, b): &(String, String)| ids.contains(&**a) && ids.contains(&**b);
        self.pairs.retain(|key, e| agents(key) && (!e.withdrawn || e.until + e.backoff > now));
    }

    fn health(&self, reported: Vec<Report>, over_limit: usize, now: Instant) -> Health {
        let avoided: Vec<(&(String, String), &Avoided)> = self.pairs.iter().filter(|(_, e)| e.avoids(now)).collect();
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
            recheck: avoided.iter().filter(|(_, e)| e.until > now).map(|(_, e)| e.until - now).min(),
        }
    }
}

/// `wall` plus `by`, to the second: the status shows it, and the API server keeps whole seconds, so a
/// finer time would read back different and make every reconcile write the status again.
fn whole_seconds(wall: &Time, by: Duration) -> Time {
    let at = wall.0.checked_add(by).unwrap_or(Timestamp::MAX);
    Time(Timestamp::from_second(at.as_second()).unwrap_or(at))
}

/// A counted report: the pair's node ids (the smaller first), the reporter's Pod and the peer's.
struct Report {
    key: (String, String),
    by: String,
    peer: String,
}

/// What the agents report: every pair of agents one lists, and the reports that count (the peer is one
/// the reporter's Pod dials), one per pair.
#[derive(Default)]
struct Reports {
    listed: BTreeSet<(String, String)>,
    counted: Vec<Report>,
}

fn reports(m: &Membership, carried: &BTreeMap<Name, Arc<Assignment>>) -> Reports {
    let reporters: Vec<_> = m.agents.values().filter(|a| !a.unreachable.is_empty()).collect();
    if reporters.is_empty() {
        return Reports::default();
    }
    let pod_of: foldhash::HashMap<&str, &str> = m.agents.values().map(|a| (&*a.node_id, &*a.pod)).collect();
    let (mut out, mut counted) = (Reports::default(), BTreeSet::new());
    for a in reporters {
        let dials = |id: &str| carried.get(&a.pod).is_some_and(|c| c.peers.iter().any(|p| p.node_id == id));
        for id in a.unreachable.ids() {
            let Some(peer) = pod_of.get(id) else { continue };
            let key = planner::unusable_pair(&a.node_id, id);
            out.listed.insert(key.clone());
            if dials(id) && counted.insert(key.clone()) {
                out.counted.push(Report { key, by: a.pod.to_string(), peer: peer.to_string() });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::{Name, Peer};
    use crate::controller::membership::Agent;

    const BACKOFF: Duration = Duration::from_secs(10);
    const RULES: Rules = Rules { backoff: BACKOFF, max_peers: 20 };

    fn fleet(reports: &[(usize, usize)]) -> Membership {
        let mut m = Membership::default();
        for i in 0..4 {
            let unreachable = reports.iter().filter(|(a, _)| *a == i).map(|(_, b)| format!("n{b}")).collect::<Vec<_>>();
            let unreachable = unreachable.iter().map(String::as_str).collect();
            let (pod, node_id, url) = (Name::from(format!("p{i}")), format!("n{i}"), format!("ws://10.0.0.{i}:1/"));
            m.agents.insert(
                pod.clone(),
                Arc::new(Agent { pod, node_id: node_id.into(), url: url.into(), domain: None, unreachable }),
            );
        }
        m
    }

    /// Each Pod dials the next two (mod 4).
    fn carried() -> BTreeMap<Name, Arc<Assignment>> {
        (0..4)
            .map(|i| {
                let peer = |j: usize| Peer { node_id: format!("n{}", (i + j) % 4).into(), url: Name::default() };
                (format!("p{i}").into(), Arc::new(Assignment::new(vec![peer(1), peer(2)], [], "mesh".into())))
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

    /// A report never withdrawn (the write dropping the pair failed, or presence is frozen by an outage,
    /// whether or not the Pod still carries the peer) is the old failure, not a new one: the pair stays
    /// avoided as it was, and nothing in the status moves. Withdrawn, it may return.
    #[test]
    fn a_report_never_withdrawn_keeps_the_pair_avoided_as_it_was() {
        let t0 = Instant::now();
        let (mut h, c) = (LinkHealth::default(), carried());
        let first = h.update(&fleet(&[(0, 1)]), &c, &RULES, (t0, &wall(0)));
        let mut dropped = carried();
        Arc::make_mut(dropped.get_mut("p0").unwrap()).peers.retain(|p| p.node_id != "n1");
        for (round, c) in [(1, &c), (2, &dropped), (3, &dropped)] {
            let r = h.update(&fleet(&[(0, 1)]), c, &RULES, (t0 + BACKOFF * round, &wall(0)));
            assert_eq!((&r.listed, r.recheck, &r.unusable), (&first.listed, None, &first.unusable), "round {round}");
        }
        let withdrawn = h.update(&fleet(&[]), &dropped, &RULES, (t0 + BACKOFF * 4, &wall(0)));
        assert_eq!(withdrawn.total, 0, "usable again");
    }

    /// At most a tenth of the links (here 1) are avoided at once, however the reports come and go: a pair
    /// that returns and fails again does not take a slot another pair holds.
    #[test]
    fn no_more_than_a_tenth_of_the_links_are_avoided() {
        let (t0, c) = (Instant::now(), carried());
        let mut h = LinkHealth::default();
        let both = h.update(&fleet(&[(0, 1), (2, 3)]), &c, &RULES, (t0, &wall(0)));
        assert_eq!((both.total, both.over_limit, &both.unusable), (1, 1, &Unusable::from([pair(0, 1)])));
        // 0–1 leaves the plan and its report goes; 2–3 takes the slot once 0–1's back-off ends.
        let t1 = t0 + BACKOFF;
        let swapped = h.update(&fleet(&[(2, 3)]), &c, &RULES, (t1, &wall(0)));
        assert_eq!((swapped.total, &swapped.unusable), (1, &Unusable::from([pair(2, 3)])));
        // 0–1 back in the plan fails again: still one avoided.
        let again = h.update(&fleet(&[(0, 1), (2, 3)]), &c, &RULES, (t1 + BACKOFF / 2, &wall(0)));
        assert_eq!((again.total, again.over_limit), (1, 1));
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
        // 8 reports of 6 pairs, each of a peer its reporter dials: 4 agents (k = 20, so 3) have at most 6
        // links, and a tenth of them rounds up to 1.
        let every = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 0), (3, 0), (3, 1)];
        let all = LinkHealth::default().update(&fleet(&every), &c, &RULES, (t0, &wall(0)));
        assert_eq!((all.total, all.listed.len(), all.over_limit, all.reported.len()), (1, 1, 5, 6));
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
