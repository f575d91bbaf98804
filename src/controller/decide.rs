//! Decide: what one reconcile wants, before any write. Admission holds back a burst's newcomers, the plan
//! gives every agent its target (or, without presence, the Pods keep what they carry), and the targets
//! become waves of Pod writes ordered so that the cap holds at every agent after every prefix of the
//! writes, whichever of them fail (docs/design.md §3.4 rule 1). Pure.
//!
//! The waves' construction. Let `now(v)` be what Pod `v` carries and `want(v)` what the plan gives it,
//! each an assignment within the cap. The **shrink** wave writes `now(v) ∩ want(v)` to every Pod that loses a
//! peer or an accept (or the removal, to a Pod that stops being an agent). While it runs, every Pod carries
//! `now` or a subset of it, so every agent's links are a subset of its links under `now`. The **grow**
//! wave then writes `want(v)` to every Pod that gains something. If every shrink write succeeded, every
//! published link is a link of `want`, so the cap holds throughout. A failed shrink write leaves its Pod
//! on `now`: that Pod, and every peer it should have dropped, is *tainted*, and no grow write touches a
//! tainted agent (neither its own, nor one that adds it as a peer or accept). An untainted agent's links
//! are then links of `want`, and a tainted one's are links of `now`: the cap holds either way.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::admission::Admission;
use super::health::{self, Health, LinkHealth};
use super::membership::Membership;
use super::observe::Observed;
use super::plan::{self, PlanOutcome, Targets};
use super::pods::PodState;
use super::policy::ValidPolicy;
use crate::assignment::{Assignment, Name};

/// What one reconcile decides, before any write.
pub struct Decision<'m> {
    /// The membership presence gives (the policy's view's), `None` without presence.
    pub members: Option<&'m Membership>,
    /// Agents admission holds back for now (see [`super::admission`]): not in the plan yet.
    pub held: BTreeSet<Name>,
    pub plan: Option<PlanOutcome>,
    pub plan_error: Option<String>,
    /// The targets of the Pods not carrying theirs: the plan's, or without one what the Pods carry (see
    /// [`adopted`]).
    pub wanted: Targets,
    pub waves: Waves,
    /// The pairs the plan avoids, and the links agents report they cannot open (see [`super::health`]).
    pub health: Health,
    /// When newcomers held back by admission may join, or an avoided pair may return.
    pub recheck: Option<Duration>,
}

/// What the decide step keeps of one policy between reconciles.
#[derive(Default)]
pub struct Memory {
    pub admission: Admission,
    pub health: LinkHealth,
    pub plan: plan::Kept,
}

/// The instant a decision is made, and the same on the wall clock (for what the status shows).
#[derive(Clone, Debug)]
pub struct Now {
    pub at: Instant,
    pub wall: Time,
}

impl From<Instant> for Now {
    /// `at` with the wall clock read now and moved by as much as `at` is from now.
    fn from(at: Instant) -> Self {
        let (wall, now) = (k8s_openapi::jiff::Timestamp::now(), Instant::now());
        let (later, earlier) = (at.saturating_duration_since(now), now.saturating_duration_since(at));
        Now { at, wall: Time(wall + later - earlier) }
    }
}

/// The decision from the membership presence gives (`None` without presence; see
/// [`super::membership::of_policy`]): admission, the plan, the targets and the writes that reach them.
/// `memory` is what the step keeps of the policy between reconciles.
pub fn decide<'m>(
    policy: &ValidPolicy,
    observed: &Observed,
    members: Option<&'m Membership>,
    memory: &mut Memory,
    now: impl Into<Now>,
) -> Decision<'m> {
    let now = now.into();
    let Memory { admission, health, plan: kept } = memory;
    let (held, recheck) = members.map(|m| admit(m, observed, admission, now.at)).unwrap_or_default();
    let o = observed;
    let rules = health::Rules { backoff: policy.unreachable_backoff, max_peers: policy.max_peers };
    let health = members.map(|m| health.update(m, &o.carried, &rules, (now.at, &now.wall))).unwrap_or_default();
    let recheck = recheck.into_iter().chain(health.recheck).min();
    let planned =
        members.map(|m| plan::targets(m, &held, made_for(policy), (&o.carried, &o.pods), &health.unusable, kept));
    let (mut plan, plan_error) = match planned {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => (None, Some(e.to_string())),
        None => (None, None),
    };
    let wanted = match plan.as_mut() {
        Some(p) => std::mem::take(&mut p.targets),
        None => adopted(observed, members.is_some(), policy.max_peers),
    };
    let node_of = |pod: &str| Some(members.filter(|_| !held.contains(pod))?.agent(pod)?.node_id.to_string());
    let waves = waves(&observed.pods, &wanted, &policy.name, &node_of);
    Decision { members, held, plan, plan_error, wanted, waves, health, recheck }
}

/// What a plan is made for: the policy's cap, its seed (the UID) and its name.
pub fn made_for(policy: &ValidPolicy) -> (u32, &str, &str) {
    (policy.max_peers, &policy.uid, &policy.name)
}

/// The newcomers of a burst to hold back (see [`super::admission`]); when to look again.
fn admit(m: &Membership, o: &Observed, admission: &mut Admission, now: Instant) -> (BTreeSet<Name>, Option<Duration>) {
    let eligible: Vec<&Name> = m.agents.keys().collect();
    admission.hold(&eligible, &|pod| o.carried.contains_key(pod), now)
}

/// With no presence, what the Pods already carry stays, minus what is gone; with presence but no plan (the
/// planner refused), nothing changes.
fn adopted(o: &Observed, has_presence: bool, cap: u32) -> Targets {
    if has_presence {
        return Targets::new();
    }
    let staying: HashSet<&str> = o.selected.iter().filter(|(_, p)| !p.terminating).map(|(n, _)| n.as_str()).collect();
    let live_ips: HashSet<String> = o
        .namespace_pods
        .values()
        .filter(|p| !p.terminating)
        .filter_map(|p| p.pod_ip.as_deref().map(str::to_owned))
        .collect();
    plan::adopt(&o.carried, &o.pods, &staying, &live_ips, cap)
}

/// One write: the assignment a Pod gets, or `None` to remove every `agentmesh.dev/*` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub pod: String,
    /// The Pod's UID as the decision saw it: the write reaches that Pod only.
    pub uid: Option<String>,
    /// The Pod's resourceVersion as the decision saw it.
    pub resource_version: Option<String>,
    /// Shared with the decision's target: a wave of thousands of new agents copies no assignment.
    pub to: Option<Arc<Assignment>>,
    /// What the Pod carried as the policy's when the decision was made (shared with the Pod cache): with
    /// `to`, the node ids the write drops or adds, worked out only when a wave failed.
    pub from: Option<Arc<Assignment>>,
    /// The Pod's agent.
    pub node_id: Option<String>,
}

impl Write {
    /// The node ids that lose their link with this Pod: those it carries and `to` does not keep.
    fn dropped(&self) -> BTreeSet<&str> {
        let kept = self.kept();
        ids(self.from.as_deref()).into_iter().filter(|id| !kept.contains(*id)).collect()
    }

    /// The node ids that gain a link with this Pod: those `to` adds to what it keeps.
    fn gained(&self) -> BTreeSet<&str> {
        let kept = self.kept();
        ids(self.to.as_deref()).into_iter().filter(|id| !kept.contains(*id)).collect()
    }

    /// The ids of the links `from` and `to` share (a peer whose URL changed is not shared).
    fn kept(&self) -> BTreeSet<String> {
        match (&self.from, &self.to) {
            (Some(from), Some(to)) => from.intersect(to).linked_ids().into_iter().map(str::to_owned).collect(),
            _ => BTreeSet::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Waves {
    pub shrink: Vec<Write>,
    pub grow: Vec<Write>,
}

impl Waves {
    pub fn is_empty(&self) -> bool {
        self.shrink.is_empty() && self.grow.is_empty()
    }

    /// The grow writes that remain safe when the shrink writes to `failed` Pods did not happen, and the
    /// Pods whose grow write is held back.
    pub fn grow_after(&self, failed: &HashSet<String>) -> (Vec<&Write>, Vec<&str>) {
        let mut tainted: HashSet<&str> = HashSet::new();
        for w in self.shrink.iter().filter(|w| failed.contains(&w.pod)) {
            tainted.extend(w.node_id.as_deref());
            tainted.extend(w.dropped());
        }
        let (mut safe, mut held) = (Vec::new(), Vec::new());
        for w in &self.grow {
            let blocked = failed.contains(&w.pod)
                || w.node_id.as_deref().is_some_and(|id| tainted.contains(id))
                || (!tainted.is_empty() && w.gained().iter().any(|id| tainted.contains(id)));
            if blocked { held.push(w.pod.as_str()) } else { safe.push(w) }
        }
        (safe, held)
    }
}

/// The waves that take every Pod in `targets` from what it carries (as `policy`'s, see
/// [`PodState::carried`]) to its target; Pods already there get no write. `node_of` gives an agent's
/// node id where membership matched it (else the Pod's node-id annotation stands).
pub fn waves(
    pods: &BTreeMap<Name, PodState>,
    targets: &Targets,
    policy: &str,
    node_of: &dyn Fn(&str) -> Option<String>,
) -> Waves {
    let mut waves = Waves::default();
    for (name, target) in targets {
        let Some(pod) = pods.get(name) else { continue };
        // Another policy's Pod is never ours to write: it leaves that policy first (see membership).
        if pod.keys.policy().is_some_and(|p| p != policy) {
            continue;
        }
        if target.as_ref().is_some_and(|want| pod.carries(want)) {
            continue;
        }
        let from = pod.carried(policy, true);
        let write = |to: Option<Arc<Assignment>>| Write {
            pod: name.to_string(),
            uid: pod.uid.as_deref().map(str::to_owned),
            resource_version: pod.resource_version.as_deref().map(str::to_owned),
            to,
            from: from.clone(),
            node_id: node_of(name).or_else(|| pod.node_id.as_deref().map(str::to_owned)),
        };
        let now = from.as_deref();
        match target {
            None if now.is_none() => {}
            None => waves.shrink.push(write(None)),
            Some(want) => {
                let kept = now
                    .map(|n| n.intersect(want))
                    .unwrap_or_else(|| Assignment { policy: policy.into(), ..Default::default() });
                let standbys = |a: &Assignment| a.standbys.len() + a.standby_accepts.len();
                let drops =
                    ids(now).len() > ids(Some(&kept)).len() || now.is_some_and(|n| standbys(n) > standbys(&kept));
                // A lowered cap reaches the agent before any peer may count on it.
                let lowers = now.is_some_and(|n| n.lowers_cap_to(want));
                // Stray keys without a policy must go before the agent may gain anything.
                let shrink = drops || lowers || (now.is_some() && pod.keys.policy().is_none());
                // The Pod does not carry `want` (checked above): it gets it, unless the shrink already writes it.
                let grow = !(shrink && kept == **want);
                if shrink {
                    waves.shrink.push(write(Some(Arc::new(kept))));
                }
                if grow {
                    waves.grow.push(write(Some(want.clone())));
                }
            }
        }
    }
    waves
}

fn ids(a: Option<&Assignment>) -> BTreeSet<&str> {
    a.map(Assignment::linked_ids).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment;
    use crate::assignment::{Peer, first_violation};
    use proptest::prelude::*;

    /// What a test reads of a [`Decision`], without the membership it borrows.
    struct Seen {
        members: bool,
        held: BTreeSet<Name>,
        plan: Option<PlanOutcome>,
        wanted: Targets,
        waves: Waves,
        recheck: Option<Duration>,
    }

    /// A small fleet in each state a reconcile meets, through the pure steps in turn (observe →
    /// membership → decide): what it plans, and which writes it asks for.
    #[test]
    fn each_state_of_a_small_fleet_gets_its_decision() {
        use super::super::admission::QUIET;
        use super::super::{fixtures, membership, observe};
        let policy = fixtures::policy(2);
        let run = |pods: &[Arc<super::super::pods::CachedPod>],
                   snap: Option<&Arc<crate::presence::Snapshot>>,
                   memory: &mut Memory,
                   at: Instant| {
            let o = observe::observe(&policy, pods, &[]);
            let m = snap.map(|s| membership::of_policy(&policy, &o, s, fixtures::NOW_MS, &|_| None));
            let d = decide(&policy, &o, m.as_ref(), memory, at);
            Seen {
                members: d.members.is_some(),
                held: d.held,
                plan: d.plan,
                wanted: d.wanted,
                waves: d.waves,
                recheck: d.recheck,
            }
        };
        let (t0, snap) = (Instant::now(), Arc::new(fixtures::presence(6)));
        let bare: Vec<_> = (0..6).map(|i| fixtures::agent(i, None)).collect();
        let mut memory = Memory::default();

        let no_presence = run(&bare, None, &mut memory, t0);
        assert!(!no_presence.members && no_presence.plan.is_none() && no_presence.waves.is_empty());

        let burst = run(&bare, Some(&snap), &mut memory, t0);
        assert!(burst.waves.is_empty() && burst.recheck.is_some(), "a burst waits for arrivals to pause");
        assert_eq!(burst.held.len(), 6);

        let planned = run(&bare, Some(&snap), &mut memory, t0 + 2 * QUIET);
        assert_eq!(planned.wanted.values().flatten().count(), 6, "every agent gets a target");
        assert_eq!((planned.waves.shrink.len(), planned.waves.grow.len()), (0, 6), "growing from nothing");
        assert!(planned.wanted.values().flatten().all(|a| a.links() <= 2), "within the cap");

        let carrying: Vec<_> =
            (0..6).map(|i| fixtures::agent(i, planned.wanted[format!("agent-{i}").as_str()].as_deref())).collect();
        let settled = run(&carrying, Some(&snap), &mut memory, t0 + 3 * QUIET);
        assert!(settled.waves.is_empty() && settled.wanted.is_empty(), "a settled fleet writes nothing");
        assert_eq!(settled.plan.as_ref().map(|p| p.settled), Some(6));

        // Without presence, a Pod that is gone is released by the others, and nothing grows.
        let gone = run(&carrying[1..], None, &mut Memory::default(), t0);
        assert!(gone.wanted.values().flatten().all(|a| !a.linked_ids().contains("n0")), "n0 is gone");
        assert!(!gone.waves.shrink.is_empty() && gone.waves.grow.is_empty());
    }

    /// A random oriented graph over `members` with every degree ≤ `cap`, as each member's assignment
    /// carrying `cap`.
    fn graph(members: &[u8], candidates: &[(u8, u8, bool)], cap: usize) -> BTreeMap<String, Assignment> {
        let mut deg: BTreeMap<u8, usize> = BTreeMap::new();
        let mut edges: BTreeSet<(u8, u8)> = BTreeSet::new();
        for &(a, b, flip) in candidates {
            let (a, b) = (members[a as usize % members.len()], members[b as usize % members.len()]);
            let (a, b) = if flip { (b, a) } else { (a, b) };
            let free = |v| deg.get(&v).copied().unwrap_or(0) < cap;
            if a != b && free(a) && free(b) && !edges.contains(&(a, b)) && !edges.contains(&(b, a)) {
                edges.insert((a, b));
                *deg.entry(a).or_default() += 1;
                *deg.entry(b).or_default() += 1;
            }
        }
        members
            .iter()
            .map(|&v| {
                let peers = edges.iter().filter(|e| e.0 == v).map(|e| peer(e.1)).collect();
                let accepts = edges.iter().filter(|e| e.1 == v).map(|e| id(e.0).into());
                (id(v), Assignment::new(peers, accepts, "p".into()).with_max_peers(cap))
            })
            .collect()
    }

    fn id(v: u8) -> String {
        format!("n{v:02}")
    }

    fn peer(v: u8) -> Peer {
        Peer { node_id: id(v).into(), url: format!("ws://{}/", id(v)).into() }
    }

    fn state(a: Option<&Assignment>, v: u8) -> PodState {
        let keys = a.map(|a| a.to_annotations().into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        PodState { node_id: Some(id(v).into()), ..PodState::with_keys(keys.unwrap_or_default()) }
    }

    /// What the Pods publish: each agent's assignment, read back from its annotations.
    fn published(pods: &BTreeMap<Name, PodState>) -> BTreeMap<String, Assignment> {
        pods.iter().filter_map(|(name, p)| Some((name.to_string(), p.carried("p", false)?.as_ref().clone()))).collect()
    }

    fn write(pods: &mut BTreeMap<Name, PodState>, w: &Write) {
        let pod = pods.get_mut(w.pod.as_str()).unwrap();
        let keys =
            w.to.as_ref()
                .map(|a| a.to_annotations().into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                .unwrap_or_default();
        *pod = PodState { node_id: pod.node_id.clone(), ..PodState::with_keys(keys) };
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Rule 1 in the API: at every prefix of the writes, in any order, whichever of them fail, no agent
        /// is over its cap, no link is dialed from both ends; and with no failure the Pods end on the plan.
        /// The cap may change between the two plans (`maxPeers` edited), and each agent is judged by the one
        /// it carries (see [`first_violation`]).
        #[test]
        fn waves_keep_the_cap_at_every_prefix_whatever_fails(
            n in 2u8..24, cap_before in 1usize..5, cap_after in 1usize..5,
            before_edges in prop::collection::vec((any::<u8>(), any::<u8>(), any::<bool>()), 0..80),
            after_edges in prop::collection::vec((any::<u8>(), any::<u8>(), any::<bool>()), 0..80),
            in_before in prop::collection::vec(any::<bool>(), 24),
            in_after in prop::collection::vec(prop::bool::weighted(0.8), 24),
            fails in prop::collection::vec(prop::bool::weighted(0.15), 48),
            order in prop::collection::vec(any::<u32>(), 48),
        ) {
            let before_members: Vec<u8> = (0..n).filter(|&v| in_before[v as usize]).collect();
            let after_members: Vec<u8> = (0..n).filter(|&v| in_after[v as usize]).collect();
            let before = if before_members.is_empty() { BTreeMap::new() } else { graph(&before_members, &before_edges, cap_before) };
            let after = if after_members.is_empty() { BTreeMap::new() } else { graph(&after_members, &after_edges, cap_after) };
            // The agents' own cap (`--max-peers`) is above both: the carried caps are what is judged.
            let cap = 4;
            let mut pods: BTreeMap<Name, PodState> = (0..n).map(|v| (id(v).into(), state(before.get(&id(v)), v))).collect();
            let targets: Targets = (0..n).map(|v| (id(v).into(), after.get(&id(v)).cloned().map(Arc::new))).collect();
            let waves = waves(&pods, &targets, "p", &|_| None);
            prop_assert_eq!(first_violation(&published(&pods), cap), None);

            let shuffled = |ws: Vec<&Write>, salt: usize| -> Vec<Write> {
                let mut ws: Vec<(u32, Write)> = ws.into_iter().enumerate().map(|(i, w)| (order[(i + salt) % order.len()], w.clone())).collect();
                ws.sort_by_key(|(k, w)| (*k, w.pod.clone()));
                ws.into_iter().map(|(_, w)| w).collect()
            };
            let mut failed = HashSet::new();
            for (i, w) in shuffled(waves.shrink.iter().collect(), 0).into_iter().enumerate() {
                if fails[i % fails.len()] { failed.insert(w.pod.clone()); continue; }
                write(&mut pods, &w);
                prop_assert_eq!(first_violation(&published(&pods), cap), None, "after shrinking {}", w.pod);
            }
            let (safe, held) = waves.grow_after(&failed);
            let mut any_failed = !failed.is_empty() || !held.is_empty();
            for (i, w) in shuffled(safe, 7).into_iter().enumerate() {
                if fails[(i + 17) % fails.len()] { any_failed = true; continue; }
                write(&mut pods, &w);
                prop_assert_eq!(first_violation(&published(&pods), cap), None, "after growing {}", w.pod);
            }
            if !any_failed {
                prop_assert_eq!(published(&pods), after);
                prop_assert!(super::waves(&pods, &targets, "p", &|_| None).is_empty(), "a second pass writes nothing");
            }
        }
    }

    #[test]
    fn a_pod_that_swaps_a_peer_shrinks_first_then_grows() {
        let now = Assignment::new(vec![peer(1), peer(2)], [], "p".into());
        let want = Assignment::new(vec![peer(1), peer(3)], [], "p".into());
        let pods = BTreeMap::from([(Name::from(id(0)), state(Some(&now), 0))]);
        let w = waves(&pods, &BTreeMap::from([(Name::from(id(0)), Some(Arc::new(want.clone())))]), "p", &|_| None);
        assert_eq!(w.shrink.len(), 1, "the old code wrote the whole new list in the removal wave");
        assert_eq!(w.shrink[0].to.as_ref().unwrap().peers, vec![peer(1)]);
        assert_eq!(w.grow[0].to.as_deref(), Some(&want));
        let (safe, held) = w.grow_after(&HashSet::from([id(0)]));
        assert!(safe.is_empty() && held == vec![id(0).as_str()], "a failed shrink holds its own grow");
    }

    #[test]
    fn a_lowered_cap_is_written_before_anything_grows() {
        let now = Assignment::new(vec![peer(1)], [], "p".into()).with_max_peers(4);
        let want = Assignment::new(vec![peer(1), peer(2)], [], "p".into()).with_max_peers(2);
        let pods = BTreeMap::from([(Name::from(id(0)), state(Some(&now), 0))]);
        let w = waves(&pods, &BTreeMap::from([(Name::from(id(0)), Some(Arc::new(want.clone())))]), "p", &|_| None);
        assert_eq!(w.shrink.len(), 1, "the cap drops in the shrink wave, though no link does");
        assert_eq!(w.shrink[0].to.as_deref(), Some(&Assignment::new(vec![peer(1)], [], "p".into()).with_max_peers(2)));
        assert_eq!(w.grow[0].to.as_deref(), Some(&want));
        let same_links = Assignment::new(vec![peer(1)], [], "p".into()).with_max_peers(2);
        let w = waves(&pods, &BTreeMap::from([(Name::from(id(0)), Some(Arc::new(same_links)))]), "p", &|_| None);
        assert_eq!((w.shrink.len(), w.grow.len()), (1, 0), "one write lowers the cap alone");
    }

    #[test]
    fn stray_keys_are_removed_and_other_policies_left_alone() {
        let stray = PodState::with_keys(BTreeMap::from([(assignment::PEERS.into(), "[]".into())]));
        let theirs = state(Some(&Assignment::new(vec![], [], "q".into())), 1);
        let pods = BTreeMap::from([("stray".into(), stray), ("theirs".into(), theirs)]);
        let mine = Assignment::new(vec![peer(2)], [], "p".into());
        let targets = BTreeMap::from([("stray".into(), None), ("theirs".into(), Some(Arc::new(mine)))]);
        let w = waves(&pods, &targets, "p", &|_| None);
        assert_eq!(w.shrink.iter().map(|w| w.pod.as_str()).collect::<Vec<_>>(), vec!["stray"]);
    }
}
