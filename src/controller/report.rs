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
    let label = telemetry::PolicyLabel { namespace: policy.namespace().unwrap_or_default(), policy: policy.name_any() };
    ctx.metrics.agents.get_or_create(&label).set(r.observed.selected.len() as i64);
    let prev = policy.status.clone().unwrap_or_default();
    let new = status::counts(&prev, r.observed, r.decision, r.outcome, &Time(Timestamp::now()));
    if let (Some(m), Some(plan)) = (r.decision.members, &r.decision.plan) {
        let eligible = m.agents.len() - r.decision.held.len();
        let changed = (prev.plan_hash != new.plan_hash).then_some(r.outcome.patched);
        let due = ctx
            .policy_state(&policy.uid().unwrap_or_default())
            .events
            .lock()
            .expect("events lock")
            .note(changed, Instant::now());
        if let Some((changes, patched)) = due {
            let note = format!(
                "{}{} agents, {} links, degree {}..{}, {} Pods patched{}",
                if changes > 1 { format!("{changes} plan changes since the last: ") } else { String::new() },
                eligible,
                plan.links,
                plan.min_degree,
                plan.max_degree,
                patched,
                if r.findings.mode == Mode::Observe { " (Observe: none patched)" } else { "" }
            );
            publish(ctx, policy, EventType::Normal, "PlanChanged", &note).await;
        }
        ctx.metrics.eligible.get_or_create(&label).set(eligible as i64);
        ctx.metrics.links.get_or_create(&label).set(plan.links as i64);
        ctx.metrics.max_links.get_or_create(&label).set(plan.max_degree as i64);
    }
    warn_on_transitions(ctx, policy, &prev, &r.findings).await;
    write_status(ctx, policy, new, &r.findings.verdicts()).await
}

/// PlanChanged Events come at most once per this long per policy, each summing the changes since the last:
/// in a churning fleet every join and leave changes the plan, and an Event each would flood the namespace.
pub const PLAN_EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// The plan changes not yet reported in a PlanChanged Event, and when the last was published.
#[derive(Debug, Default)]
pub struct PlanEvents {
    last: Option<Instant>,
    changes: u32,
    patched: usize,
}

impl PlanEvents {
    /// Takes in one reconcile at `now`: its plan change, if any (with the Pods it patched). Returns what
    /// an Event should report now (changes, Pods patched), if one is due: the first change at once, later
    /// ones once [`PLAN_EVENT_INTERVAL`] has passed, at the next reconcile (a poll interval at most).
    pub fn note(&mut self, changed: Option<usize>, now: Instant) -> Option<(u32, usize)> {
        if let Some(patched) = changed {
            self.changes += 1;
            self.patched += patched;
        }
        let due = self.last.is_none_or(|t| now.saturating_duration_since(t) >= PLAN_EVENT_INTERVAL);
        (self.changes > 0 && due).then(|| {
            self.last = Some(now);
            (std::mem::take(&mut self.changes), std::mem::take(&mut self.patched))
        })
    }
}

/// Warning Events when a problem starts (not on every reconcile while it lasts).
async fn warn_on_transitions(ctx: &Context, policy: &MeshPolicy, prev: &MeshPolicyStatus, f: &Findings) {
    let had = |type_: &str, reason: &str| prev.conditions.iter().any(|c| c.type_ == type_ && c.reason == reason);
    let was_reachable =
        prev.conditions.iter().find(|c| c.type_ == status::RENDEZVOUS_REACHABLE).map(|c| c.status == "True");
    if let Some((reason, message)) = &f.unreachable
        && was_reachable != Some(false)
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
    if new == prev || !ctx.leadership.may_write() {
        return Ok(());
    }
    let api: Api<MeshPolicy> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    let body = json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy", "status": new});
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&policy.name_any(), &params, &Patch::Apply(&body)).await.map_err(Error::Status)?;
    Ok(())
}

pub async fn publish(ctx: &Context, policy: &MeshPolicy, type_: EventType, reason: &str, note: &str) {
    // events.k8s.io caps a note at 1 kB.
    let note = status::truncate(note, 1000);
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first change is reported at once; changes within the interval are summed into the next
    /// Event, which comes at the first reconcile after the interval, with or without a change then.
    #[test]
    fn plan_changes_are_reported_at_most_once_per_interval() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut events = PlanEvents::default();
        // (seconds, the plan change then with its Pods patched, the Event due then)
        type Step = (u64, Option<usize>, Option<(u32, usize)>);
        let steps: [Step; 8] = [
            (0, None, None),
            (1, Some(9), Some((1, 9))),
            (2, Some(8), None),
            (30, Some(9), None),
            (40, None, None),
            (61, None, Some((2, 17))),
            (62, None, None),
            (200, Some(1), Some((1, 1))),
        ];
        for (s, changed, want) in steps {
            assert_eq!(events.note(changed, at(s)), want, "at {s} s");
        }
    }
}
