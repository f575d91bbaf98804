//! Status: the MeshPolicy's status and conditions, built purely from what a reconcile found (the writes,
//! metrics and Events are in [`super::report`]). Kubernetes conventions: one condition per type,
//! `lastTransitionTime` moves only when `status` changes, `observedGeneration` set.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::apply::Outcome;
use super::decide::Decision;
use super::membership::{Exclusion, Membership};
use super::observe::Observed;
use super::policy::ValidPolicy;
use super::presence::Read;
use crate::api::{ExcludedPod, MeshPolicyStatus, Mode};
use crate::assignment::Name;

pub const READY: &str = "Ready";
pub const RENDEZVOUS_REACHABLE: &str = "RendezvousReachable";
pub const DEGRADED: &str = "Degraded";
pub const CONFLICT: &str = "Conflict";
pub const MESH_AS_PLANNED: &str = "MeshAsPlanned";

/// A condition's status. `Unknown` while the truth cannot be known yet: before the first presence read
/// (and before any has failed), the rendezvous' reachability and the mesh's health are not known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Truth {
    fn from(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

/// A condition as a reconcile decides it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub type_: &'static str,
    pub status: Truth,
    pub reason: String,
    pub message: String,
}

impl Verdict {
    pub fn new(type_: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status: status.into(), reason: reason.into(), message: message.into() }
    }

    pub fn unknown(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status: Truth::Unknown, reason: reason.into(), message: message.into() }
    }
}

/// What a reconcile found, as the conditions need it.
#[derive(Debug, Default)]
pub struct Findings {
    pub mode: Mode,
    /// Whether any presence has been read (in this leadership term).
    pub has_presence: bool,
    /// Why the rendezvous cannot be read, while it cannot.
    pub unreachable: Option<(String, String)>,
    /// Why the latest read is held as suspect, while it is.
    pub suspect: Option<String>,
    pub duplicate_ids: Vec<String>,
    pub disconnected: bool,
    pub conflicted: Vec<String>,
    pub plan_error: Option<String>,
    /// Pods whose write failed (with the API's answer), and how many grow writes were held back for them.
    pub write_failures: BTreeMap<String, String>,
    pub held: usize,
    /// Agents of a burst held back until arrivals pause (see `admission`): not in the plan yet.
    pub arriving: usize,
    /// Links the Pods carry that an agent reports it cannot open: (reporter Pod, peer Pod).
    pub unreachable_links: Vec<(String, String)>,
    /// Pairs the plan avoids, and pairs reported but not avoided (over a tenth of the links).
    pub avoided: usize,
    pub over_limit: usize,
}

impl Findings {
    /// What one reconcile found.
    pub fn of(policy: &ValidPolicy, o: &Observed, read: &Read, d: &Decision, outcome: &Outcome) -> Self {
        let members = d.members;
        Self {
            mode: policy.mode,
            has_presence: read.snapshot.is_some(),
            unreachable: read.failure.clone(),
            suspect: read.suspect.clone(),
            conflicted: o.conflicted.iter().map(Name::to_string).collect(),
            plan_error: d.plan_error.clone(),
            // A write refused because its Pod changed since the decision is decided again at once; one
            // refused by the leader fence belongs to the leader.
            write_failures: outcome
                .failed
                .iter()
                .filter(|(_, e)| !e.is_stale() && !e.is_fenced())
                .map(|(pod, e)| (pod.clone(), e.to_string()))
                .collect(),
            held: outcome.held.len(),
            arriving: d.held.len(),
            duplicate_ids: members.map(duplicate_ids).unwrap_or_default(),
            disconnected: d.plan.as_ref().is_some_and(|p| p.components > 1 && policy.max_peers >= 2),
            unreachable_links: d.health.reported.clone(),
            avoided: d.health.total,
            over_limit: d.health.over_limit,
        }
    }

    /// One line naming the failed writes, for a condition and an Event.
    pub fn write_failure_note(&self) -> Option<String> {
        let (pod, error) = self.write_failures.iter().next()?;
        Some(format!(
            "{} Pod writes failed ({} more held back until they succeed); first: Pod {pod}: {error}",
            self.write_failures.len(),
            self.held
        ))
    }

    /// The five conditions.
    pub fn verdicts(&self) -> Vec<Verdict> {
        let reachable = match &self.unreachable {
            Some((reason, message)) => Verdict::new(RENDEZVOUS_REACHABLE, false, reason.clone(), message.clone()),
            None if !self.has_presence => {
                Verdict::unknown(RENDEZVOUS_REACHABLE, "NotReadYet", "no presence read yet in this leadership term")
            }
            None => Verdict::new(RENDEZVOUS_REACHABLE, true, "PresenceRead", "presence read from the rendezvous"),
        };
        let conflict = if self.conflicted.is_empty() {
            Verdict::new(CONFLICT, false, "NoConflict", "")
        } else {
            let message = format!("Pods owned by an older MeshPolicy: {}", self.conflicted.join(", "));
            Verdict::new(CONFLICT, true, "SelectedByOlderPolicy", message)
        };
        vec![reachable, self.degraded(), conflict, self.ready(), self.mesh_as_planned()]
    }

    /// Whether the links the agents report match the plan: no carried link is one an agent cannot open.
    fn mesh_as_planned(&self) -> Verdict {
        if self.reading() {
            return Verdict::unknown(MESH_AS_PLANNED, "NoPresence", "no presence read yet");
        }
        let avoided = match self.avoided {
            0 => String::new(),
            n => format!("the plan avoids {n} pairs of agents that could not link"),
        };
        if self.unreachable_links.is_empty() {
            return Verdict::new(MESH_AS_PLANNED, true, "AllLinksOpen", avoided);
        }
        let named: Vec<String> =
            self.unreachable_links.iter().take(3).map(|(a, b)| format!("{a} cannot reach {b}")).collect();
        let mut message = format!(
            "{} planned links cannot be opened ({}); the next plan avoids them",
            self.unreachable_links.len(),
            named.join(", ")
        );
        if self.over_limit > 0 {
            message = format!(
                "{message}, but for {} pairs: the plan avoids at most a tenth of its links ({} now)",
                self.over_limit, self.avoided
            );
        }
        Verdict::new(MESH_AS_PLANNED, false, "UnreachableLinks", message)
    }

    /// Whether nothing has been read and nothing has failed yet: the first read is still on its way.
    fn reading(&self) -> bool {
        !self.has_presence && self.unreachable.is_none() && self.suspect.is_none()
    }

    fn degraded(&self) -> Verdict {
        let yes = |reason: &str, message: String| Verdict::new(DEGRADED, true, reason, message);
        if let (false, Some(why)) = (self.has_presence, &self.suspect) {
            yes("SuspectPresence", why.clone())
        } else if self.reading() {
            Verdict::unknown(DEGRADED, "NoPresence", "no presence read yet: the mesh's health is not known")
        } else if !self.has_presence {
            yes("NoPresence", "no presence read yet: Pods keep what they carry, Pods that are gone are released".into())
        } else if let Some(note) = self.write_failure_note() {
            yes("PatchFailed", note)
        } else if self.unreachable.is_some() {
            yes("StalePresence", "planning from the last presence read before the outage".into())
        } else if let Some(why) = &self.suspect {
            yes("SuspectPresence", why.clone())
        } else if !self.duplicate_ids.is_empty() {
            yes("DuplicateNodeId", self.duplicate_ids.join("; "))
        } else if self.disconnected {
            yes("Disconnected", "the planned mesh has more than one component".into())
        } else {
            Verdict::new(DEGRADED, false, "AsPlanned", "")
        }
    }

    fn ready(&self) -> Verdict {
        let no = |reason: &str, message: String| Verdict::new(READY, false, reason, message);
        if let Some(e) = &self.plan_error {
            no("PlanFailed", e.clone())
        } else if self.reading() {
            Verdict::unknown(READY, "NoPresence", "waiting for the first presence read")
        } else if !self.has_presence {
            no("NoPresence", "waiting for the first presence read".into())
        } else if let Some(note) = self.write_failure_note() {
            no("PatchFailed", note)
        } else if self.arriving > 0 {
            no(
                "Admitting",
                format!("{} agents arrived together; they join the plan once arrivals pause", self.arriving),
            )
        } else if self.mode == Mode::Observe {
            Verdict::new(READY, true, "Observed", "planned; Observe mode patches no Pod")
        } else {
            Verdict::new(READY, true, "Applied", "every eligible agent carries its assignment")
        }
    }
}

fn duplicate_ids(m: &Membership) -> Vec<String> {
    let set: BTreeSet<String> = m
        .excluded
        .values()
        .filter(|e| matches!(e, Exclusion::DuplicateNodeId { .. }))
        .map(|e| truncate(&e.to_string(), 256))
        .collect();
    set.into_iter().collect()
}

/// The counts and the plan's shape (all but the conditions), from `prev`. An agent counts as assigned once
/// it carries its target: already (see [`super::plan::targets`]), or once its write reached it.
pub fn counts(prev: &MeshPolicyStatus, o: &Observed, d: &Decision, outcome: &Outcome, now: &Time) -> MeshPolicyStatus {
    let mut new = MeshPolicyStatus { selected: o.selected.len() as u32, ..prev.clone() };
    let carries = |pod: &Name, a: &crate::assignment::Assignment| o.pods.get(pod).is_some_and(|s| s.carries(a));
    let reached =
        d.wanted.iter().filter(|(pod, t)| t.as_ref().is_some_and(|a| carries(pod, a) || outcome.reached(pod)));
    new.assigned = d.plan.as_ref().map_or(0, |p| p.settled) + reached.count() as u32;
    let (Some(m), Some(plan)) = (d.members, &d.plan) else { return new };
    new.eligible = (m.agents.len() - d.held.len()) as u32;
    new.links = plan.links;
    new.max_degree = plan.max_degree;
    new.min_degree = plan.min_degree;
    new.components = plan.components;
    new.plan_hash = Some(plan.hash.clone());
    new.excluded_total = (m.excluded.len() + d.held.len()) as u32;
    // The first 100 by name, the agents admission holds among them.
    let arriving = d.held.iter().take(100).map(|pod| (pod, Exclusion::Arriving));
    let excluded: BTreeMap<&Name, Exclusion> =
        m.excluded.iter().take(100).map(|(pod, why)| (pod, why.clone())).chain(arriving).collect();
    new.excluded = excluded
        .into_iter()
        .take(100)
        .map(|(pod, why)| ExcludedPod { pod: pod.to_string(), reason: truncate(&why.to_string(), 256) })
        .collect();
    new.unusable_links = d.health.listed.clone();
    new.unusable_links_total = d.health.total as u32;
    if prev.plan_hash != new.plan_hash {
        new.last_plan_time = Some(now.clone());
    }
    new
}

/// The conditions to publish: each verdict, keeping the previous `lastTransitionTime` of a condition whose
/// status did not change.
pub fn conditions(verdicts: &[Verdict], previous: &[Condition], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = v.status.as_str().to_string();
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: v.type_.to_string(),
                status,
                reason: v.reason.clone(),
                message: truncate(&v.message, 1024),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// `s` cut to at most `max` bytes (on a character boundary) plus an ellipsis: presence and Pods are not
/// ours, and what they say (long lists of Pods, huge addresses) must not grow a condition, the status or an
/// Event past what the API server accepts.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts a reconcile reports, as the fleet moves from unplanned to written to settled.
    #[test]
    fn assigned_counts_only_agents_that_carry_or_were_just_given_their_plan() {
        use super::super::admission::QUIET;
        use super::super::{decide, fixtures, membership, observe};
        use std::time::Instant;
        let policy = fixtures::policy(2);
        let (t0, snap) = (Instant::now(), std::sync::Arc::new(fixtures::presence(4)));
        let mut memory = decide::Memory::default();
        let judge = |pods: &[std::sync::Arc<super::super::pods::CachedPod>]| {
            let o = observe::observe(&policy, pods, &[]);
            let m = membership::of_policy(&policy, &o, &snap, fixtures::NOW_MS, &|_| None);
            (o, m)
        };
        let bare: Vec<_> = (0..4).map(|i| fixtures::agent(i, None)).collect();
        let (o, m) = judge(&bare);
        decide::decide(&policy, &o, Some(&m), &mut memory, t0);
        let d = decide::decide(&policy, &o, Some(&m), &mut memory, t0 + 2 * QUIET);
        let (before, now) =
            (MeshPolicyStatus::default(), Time(k8s_openapi::jiff::Timestamp::from_second(100).unwrap()));
        let mut written = Outcome::default();
        let unwritten = counts(&before, &o, &d, &written, &now);
        assert_eq!((unwritten.selected, unwritten.eligible, unwritten.assigned), (4, 4, 0), "nothing written yet");
        assert_eq!(unwritten.last_plan_time, Some(now.clone()), "a new plan");
        written.written.extend(["agent-0".to_string(), "agent-1".to_string()]);
        written.failed.insert("agent-1".into(), super::super::apply::WriteError::TimedOut);
        assert_eq!(counts(&before, &o, &d, &written, &now).assigned, 1, "a failed write does not count");

        let carrying: Vec<_> =
            (0..4).map(|i| fixtures::agent(i, d.wanted[format!("agent-{i}").as_str()].as_deref())).collect();
        let (o, m) = judge(&carrying);
        let settled = decide::decide(&policy, &o, Some(&m), &mut memory, t0 + 3 * QUIET);
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(200).unwrap());
        let status = counts(&unwritten, &o, &settled, &Outcome::default(), &later);
        assert_eq!(status.assigned, 4, "agents carrying their plan count without a write");
        assert_eq!(status.last_plan_time, Some(now), "lastPlanTime moves only with the plan");
        assert_eq!(status.plan_hash, unwritten.plan_hash);
    }
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    /// `excluded` is cut at 100; `excludedTotal` says how many there are.
    #[test]
    fn excluded_total_counts_what_the_list_leaves_out() {
        use super::super::{decide, fixtures, membership, observe};
        let policy = fixtures::policy(2);
        let snap = std::sync::Arc::new(fixtures::presence(4));
        let pods: Vec<_> = (0..150).map(|i| fixtures::agent(i, None)).collect();
        let o = observe::observe(&policy, &pods, &[]);
        let m = membership::of_policy(&policy, &o, &snap, fixtures::NOW_MS, &|_| None);
        let d = decide::decide(&policy, &o, Some(&m), &mut decide::Memory::default(), std::time::Instant::now());
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(100).unwrap());
        let status = counts(&MeshPolicyStatus::default(), &o, &d, &Outcome::default(), &now);
        // 146 have no presence entry; the other 4 arrived together and wait outside the plan.
        assert_eq!((d.held.len(), m.excluded.len()), (4, 146));
        assert_eq!((status.selected, status.excluded.len(), status.excluded_total), (150, 100, 150));
    }

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let first = conditions(&[Verdict::new(READY, true, "Planned", "ok")], &[], Some(1), &at(100));
        assert_eq!(first[0].last_transition_time, at(100));
        let same = conditions(&[Verdict::new(READY, true, "Planned", "other message")], &first, Some(2), &at(200));
        assert_eq!(same[0].last_transition_time, at(100), "same status keeps its transition time");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = conditions(&[Verdict::new(READY, false, "Invalid", "x")], &same, Some(2), &at(300));
        assert_eq!(flipped[0].last_transition_time, at(300));
    }

    #[test]
    fn verdicts_say_what_blocks_and_never_claim_ready_over_failed_writes() {
        let reason = |f: &Findings, t: &str| {
            let v = f.verdicts().into_iter().find(|v| v.type_ == t).unwrap();
            (v.status, v.reason)
        };
        let mut f = Findings { has_presence: true, ..Default::default() };
        let (yes, no, unknown) = (Truth::True, Truth::False, Truth::Unknown);
        assert_eq!(reason(&f, READY), (yes, "Applied".into()));
        assert_eq!(reason(&f, DEGRADED), (no, "AsPlanned".into()));
        f.write_failures.insert("agent-3".into(), "annotations too long".into());
        f.held = 2;
        assert_eq!(reason(&f, READY), (no, "PatchFailed".into()));
        assert!(f.write_failure_note().unwrap().contains("agent-3: annotations too long"));
        let f = Findings { has_presence: true, suspect: Some("3 of 4".into()), ..Default::default() };
        assert_eq!(reason(&f, DEGRADED), (yes, "SuspectPresence".into()));
        assert_eq!(reason(&f, RENDEZVOUS_REACHABLE), (yes, "PresenceRead".into()));
        let f = Findings { mode: Mode::Observe, has_presence: true, ..Default::default() };
        assert_eq!(reason(&f, READY), (yes, "Observed".into()));
        // The old code said Applied while a whole burst waited outside the plan.
        let f = Findings { has_presence: true, arriving: 50, ..Default::default() };
        assert_eq!(reason(&f, READY), (no, "Admitting".into()));
        let f = Findings { unreachable: Some(("Timeout".into(), "x".into())), ..Default::default() };
        assert_eq!(reason(&f, READY), (no, "NoPresence".into()));
        assert_eq!(reason(&f, RENDEZVOUS_REACHABLE), (no, "Timeout".into()));
        // Before the first read, and before any failure, nothing is known yet.
        let f = Findings::default();
        for (type_, why) in [(READY, "NoPresence"), (DEGRADED, "NoPresence"), (RENDEZVOUS_REACHABLE, "NotReadYet")] {
            assert_eq!(reason(&f, type_), (unknown, why.into()), "{type_}");
        }
        assert_eq!(reason(&f, CONFLICT), (no, "NoConflict".into()));
        assert_eq!(reason(&f, MESH_AS_PLANNED), (unknown, "NoPresence".into()));
        let mut f = Findings { has_presence: true, avoided: 1, ..Default::default() };
        assert_eq!(reason(&f, MESH_AS_PLANNED), (yes, "AllLinksOpen".into()));
        f.unreachable_links.push(("agent-1".into(), "agent-2".into()));
        assert_eq!(reason(&f, MESH_AS_PLANNED), (no, "UnreachableLinks".into()));
        let v = f.verdicts().into_iter().find(|v| v.type_ == MESH_AS_PLANNED).unwrap();
        assert!(v.message.contains("agent-1 cannot reach agent-2"), "{}", v.message);
        f.over_limit = 3;
        let v = f.verdicts().into_iter().find(|v| v.type_ == MESH_AS_PLANNED).unwrap();
        assert!(v.message.contains("but for 3 pairs"), "{}", v.message);
        // The metrics forget a deleted policy's condition series by these names.
        assert!(f.verdicts().iter().all(|v| crate::telemetry::CONDITIONS.contains(&v.type_)));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let c = conditions(&[Verdict::new(DEGRADED, true, "R", long)], &[], None, &at(1));
        assert!(c[0].message.len() <= 1024 + "…".len());
        assert!(c[0].message.ends_with('…'));
    }
}
