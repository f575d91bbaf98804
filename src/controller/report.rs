//! Report, the reconcile's last step: the status (built in [`super::status`]) written by server-side apply
//! when it changed, the policy's gauges, and Events when a plan changes or a problem starts.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use std::time::{Duration, Instant};

use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::apply::Outcome;
use super::decide::Decision;
use super::status::{self, Findings};
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{MeshPolicy, MeshPolicyStatus, Mode};
use crate::telemetry;

/// What one reconcile hands the report.
pub struct Reconciled<'a> {
    pub observed: &'a super::observe::Observed,
    pub decision: &'a Decision<'a>,
    pub outcome: &'a Outcome,
    pub findings: Findings,
}

pub async fn report(ctx: &Context, policy: &MeshPolicy, r: Reconciled<'_>) -> Result<(), Error> {
    let label = telemetry::PolicyLabel::of(policy);
    let prev = policy.status.clone().unwrap_or_default();
    let new = status::counts(&prev, r.observed, r.decision, r.outcome, &Time(Timestamp::now()));
    set_gauges(ctx, &label, &new, policy.spec.max_peers, r.decision.plan.is_some());
    if let (Some(m), Some(plan)) = (r.decision.members, &r.decision.plan) {
        let eligible = m.agents.len() - r.decision.held.len();
        let changed = (prev.plan_hash != new.plan_hash).then_some(r.outcome.patched);
        let kept = ctx.policy_state(&policy.uid().unwrap_or_default());
        let now = (ctx.leadership.term(), Instant::now());
        let due = kept.events.lock().expect("events lock").note(changed, now, ctx.plan_event_interval);
        if let Some(d) = due {
            let note = format!(
                "{}{} agents, {} links, degree {}..{}, {} Pod writes{}",
                if d.changes > 1 { format!("{} plan changes since the last: ", d.changes) } else { String::new() },
                eligible,
                plan.links,
                plan.min_degree,
                plan.max_degree,
                d.writes,
                if r.findings.mode == Mode::Observe { " (mode Observe: the plan is not written)" } else { "" }
            );
            // A recorder of its own: the shared one would fold this Event into the last PlanChanged as a
            // series, which keeps the first note, so the counts of now would never show.
            let own = kube::runtime::events::Recorder::new(ctx.client.clone(), ctx.reporter.clone());
            if !publish_with(&own, policy, EventType::Normal, "PlanChanged", &note).await {
                kept.events.lock().expect("events lock").unsent(d);
            }
        }
    }
    warn_on_transitions(ctx, policy, &prev, &r.findings).await;
    write_status(ctx, policy, new, &r.findings.verdicts()).await
}

/// The policy's gauges, from the status being written. The plan's own (eligible, links, most links) only
/// when a plan was made now: the status keeps the last plan's, which may predate a changed `maxPeers`.
/// A replica that lost leadership meanwhile drops them again: its gauges were cleared when it did.
fn set_gauges(ctx: &Context, label: &telemetry::PolicyLabel, s: &MeshPolicyStatus, max_peers: u32, planned: bool) {
    let m = &ctx.metrics;
    for (family, value) in [(&m.selected, s.selected), (&m.assigned, s.assigned), (&m.max_peers, max_peers)] {
        family.get_or_create(label).set(i64::from(value));
    }
    for (family, value) in [(&m.eligible, s.eligible), (&m.links, s.links), (&m.max_degree, s.max_degree)] {
        if planned {
            family.get_or_create(label).set(i64::from(value));
        } else {
            family.remove(label);
        }
    }
    if !ctx.leadership.may_write() {
        m.forget_policy(label);
    }
}

/// The plan changes of one policy not yet reported in a PlanChanged Event, and when the last was
/// published: Events come at most once per interval (`--plan-event-interval`), each summing the changes
/// since the last, since in a churning fleet every join and leave changes the plan. The count belongs to
/// one leadership term: a replica that leads again starts over, and reports no other term's changes.
#[derive(Debug, Default)]
pub struct PlanEvents {
    term: u64,
    last: Option<Instant>,
    pending: Due,
}

/// What a PlanChanged Event reports: the plan changes it sums and their Pod writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub changes: u32,
    pub writes: usize,
}

impl PlanEvents {
    /// Takes in one reconcile at `(term, now)`: its plan change, if any, with its Pod writes. Returns what
    /// an Event should report now, if one is due: the first change at once, later ones once `interval`
    /// has passed, at the next reconcile (a poll interval at most).
    pub fn note(&mut self, changed: Option<usize>, (term, now): (u64, Instant), interval: Duration) -> Option<Due> {
        if self.term != term {
            *self = PlanEvents { term, ..Default::default() };
        }
        if let Some(writes) = changed {
            self.pending.changes += 1;
            self.pending.writes += writes;
        }
        let due = self.last.is_none_or(|t| now.saturating_duration_since(t) >= interval);
        (self.pending.changes > 0 && due).then(|| {
            self.last = Some(now);
            std::mem::take(&mut self.pending)
        })
    }

    /// Puts back what an Event that could not be published was to report, for the next one.
    pub fn unsent(&mut self, d: Due) {
        self.pending.changes += d.changes;
        self.pending.writes += d.writes;
    }
}

/// Warning Events when a problem starts (not on every reconcile while it lasts).
async fn warn_on_transitions(ctx: &Context, policy: &MeshPolicy, prev: &MeshPolicyStatus, f: &Findings) {
    let had = |type_: &str, reason: &str| prev.conditions.iter().any(|c| c.type_ == type_ && c.reason == reason);
    let was_unreachable =
        prev.conditions.iter().any(|c| c.type_ == status::RENDEZVOUS_REACHABLE && c.status == "False");
    if let Some((reason, message)) = &f.unreachable
        && !was_unreachable
    {
        publish(ctx, policy, EventType::Warning, "RendezvousUnreachable", &format!("{reason}: {message}")).await;
    }
    if let Some(why) = &f.suspect
        && !had(status::DEGRADED, "SuspectPresence")
    {
        publish(ctx, policy, EventType::Warning, "SuspectPresence", why).await;
    }
    if let Some(note) = f.write_failure_note()
        && !had(status::READY, "PatchFailed")
    {
        publish(ctx, policy, EventType::Warning, "PatchFailed", &note).await;
    }
    if !f.conflicted.is_empty() && !had(status::CONFLICT, "SelectedByOlderPolicy") {
        let note = format!("Pods selected by an older MeshPolicy: {}", f.conflicted.join(", "));
        publish(ctx, policy, EventType::Warning, "Conflict", &note).await;
    }
}

/// A spec the controller refuses: `Ready=False` naming the field, and a Warning Event.
pub async fn invalid(ctx: &Context, policy: &MeshPolicy, message: String) -> Result<(), Error> {
    // Nothing of the last valid spec's series holds now: only the Ready condition is known.
    let label = telemetry::PolicyLabel::of(policy);
    ctx.metrics.forget_policy(&label);
    publish(ctx, policy, EventType::Warning, "InvalidPolicy", &message).await;
    let verdicts = [status::Verdict::new(status::READY, false, "InvalidPolicy", message)];
    write_status(ctx, policy, MeshPolicyStatus::default(), &verdicts).await
}

async fn write_status(
    ctx: &Context,
    policy: &MeshPolicy,
    mut new: MeshPolicyStatus,
    verdicts: &[status::Verdict],
) -> Result<(), Error> {
    let prev = policy.status.clone().unwrap_or_default();
    new.observed_generation = policy.metadata.generation;
    new.conditions =
        status::conditions(verdicts, &prev.conditions, policy.metadata.generation, &Time(Timestamp::now()));
    let label = telemetry::PolicyLabel::of(policy);
    for v in verdicts {
        ctx.metrics.set_condition(&label, v.type_, v.status.as_str());
    }
    if !ctx.leadership.may_write() {
        ctx.metrics.forget_policy(&label);
    }
    if new == prev || !ctx.leadership.may_write() {
        return Ok(());
    }
    let api: Api<MeshPolicy> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    let body = json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy", "status": new});
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&policy.name_any(), &params, &Patch::Apply(&body)).await.map_err(Error::Status)?;
    Ok(())
}

/// Publishes an Event about `policy`; whether it was. The same reason again within a few minutes adds to
/// the first Event's series (its count), keeping its note.
pub async fn publish(ctx: &Context, policy: &MeshPolicy, type_: EventType, reason: &str, note: &str) -> bool {
    publish_with(&ctx.recorder, policy, type_, reason, note).await
}

async fn publish_with(
    recorder: &kube::runtime::events::Recorder,
    policy: &MeshPolicy,
    type_: EventType,
    reason: &str,
    note: &str,
) -> bool {
    // events.k8s.io caps a note at 1 kB.
    let note = status::truncate(note, 1000);
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    let result = recorder.publish(&event, &policy.object_ref(&())).await;
    if let Err(e) = &result {
        warn!(error = %e, reason, "could not publish an Event");
    }
    result.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first change is reported at once; changes within the interval are summed into the next
    /// Event, which comes at the first reconcile after the interval, with or without a change then. An
    /// Event that could not be published is summed into the next; a new leadership term starts over.
    #[test]
    fn plan_changes_are_reported_at_most_once_per_interval() {
        let t0 = Instant::now();
        let at = |s: u64| (1, t0 + Duration::from_secs(s));
        let due = |changes, writes| Some(Due { changes, writes });
        let minute = Duration::from_secs(60);
        let mut events = PlanEvents::default();
        // (seconds, the plan change then with its Pod writes, the Event due then)
        type Step = (u64, Option<usize>, Option<Due>);
        let steps: [Step; 8] = [
            (0, None, None),
            (1, Some(9), due(1, 9)),
            (2, Some(8), None),
            (30, Some(9), None),
            (40, None, None),
            (61, None, due(2, 17)),
            (62, None, None),
            (200, Some(1), due(1, 1)),
        ];
        for (s, changed, want) in steps {
            assert_eq!(events.note(changed, at(s), minute), want, "at {s} s");
        }
        events.unsent(Due { changes: 1, writes: 1 });
        assert_eq!(events.note(Some(2), at(300), minute), due(2, 3), "the unsent Event's changes come with the next");
        assert_eq!(events.note(Some(4), at(301), minute), None);
        assert_eq!(events.note(None, (2, t0 + Duration::from_secs(302)), minute), None, "a new term forgets the old");
        assert_eq!(events.note(Some(5), (2, t0 + Duration::from_secs(303)), minute), due(1, 5));
    }
}
