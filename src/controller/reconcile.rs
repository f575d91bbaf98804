//! One reconcile of one MeshPolicy, as a driver over its steps, each in its own module:
//!
//! [`policy`](super::policy) (validate) → [`presence`](super::presence) (read) → [`observe`](super::observe)
//! (the caches) → [`membership`](super::membership) → [`decide`](super::decide) (admission, [`plan`](super::plan),
//! waves) → [`apply`](super::apply) → [`status`](super::status) and [`report`](super::report).
//!
//! Each step hands the next a typed value: a [`ValidPolicy`], an [`Observed`], a [`Read`](super::presence::Read) with the
//! membership it gives, a [`Decision`], an [`Outcome`], and the [`Findings`] the status is built from.
//! Validate, observe, membership, decide and status are pure.
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use tracing::{Instrument, debug, error, info, warn};

use super::apply::{self, Outcome};
use super::decide::{self, Decision, Waves};
use super::error::{CleanupError, finalizer_patch_refused};
use super::fleet::{self, Fleet};
use super::membership::{Membership, Rules};
use super::observe::{self, Filing, Observed};
use super::plan::{self, PlanOutcome, Targets};
use super::pods::CachedPod;
use super::policy::ValidPolicy;
use super::presence::{self, PROMPT_FETCH_INTERVAL, Read};
use super::report::{self, Reconciled};
use super::status::Findings;
use super::{Context, Error, FINALIZER};
use crate::api::{MeshPolicy, Mode};
use crate::assignment::Name;
use crate::telemetry;

/// How soon a reconcile that found the caches behind (not synced yet, or older than our own writes) runs
/// again.
const CACHE_WAIT: Duration = Duration::from_millis(200);
/// How soon a reconcile whose writes failed, or were cut short by a lost leadership, runs again (one
/// whose writes were only refused as stale runs again after [`CACHE_WAIT`]).
const WRITE_RETRY: Duration = Duration::from_secs(2);

/// One reconcile, under a span naming the policy: every line it logs says which.
pub async fn reconcile(policy: Arc<MeshPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", namespace = %policy.namespace().unwrap_or_default(), policy = %policy.name_any());
    run(policy, ctx).instrument(span).await
}

async fn run(policy: Arc<MeshPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.retain_policy_states();
    if !ctx.leadership.may_write() {
        // Standbys keep their caches warm and write nothing; becoming leader re-runs every policy.
        return Ok(Action::await_change());
    }
    // An empty cache must not look like an empty fleet (nor a deleted policy like one without Pods).
    if !ctx.synced() {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let started = Instant::now();
    let (name, read) = (policy.name_any(), policy.resource_version());
    let api: Api<MeshPolicy> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, policy, |event| async {
        match event {
            Finalized::Apply(p) => reconcile_policy(&p, &ctx).await,
            Finalized::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await;
    let result = match result {
        Err(e) if finalizer_patch_refused(&e) && changed_since(&api, &name, read.as_deref()).await => {
            info!(error = %e, "the policy changed since the cache read it: running again");
            Ok(Action::requeue(CACHE_WAIT))
        }
        other => other.map_err(Error::from),
    };
    crate::memory::release();
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.get_or_create(&telemetry::ResultLabel { result: label.into() }).inc();
    result
}

/// Whether the stored policy is no longer the version `read` (or is gone): a finalizer patch refused then
/// was made from a stale cache, and the next run reads a newer one. Refused on the version it read, the
/// patch would be refused again: that is a failure.
pub async fn changed_since(api: &Api<MeshPolicy>, name: &str, read: Option<&str>) -> bool {
    match api.get_metadata_opt(name).await {
        Ok(Some(stored)) => stored.resource_version().as_deref() != read,
        Ok(None) => true,
        Err(_) => false,
    }
}

pub fn error_policy(policy: Arc<MeshPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    let source = std::error::Error::source(error).map(ToString::to_string);
    let (namespace, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
    warn!(namespace, policy = name, error = %error, kind = error.kind(), source, "reconcile failed");
    ctx.metrics.reconcile_errors.get_or_create(&telemetry::KindLabel { kind: error.kind().into() }).inc();
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_policy(object: &MeshPolicy, ctx: &Arc<Context>) -> Result<Action, Error> {
    let policy = match ValidPolicy::new(object) {
        Ok(p) => p,
        Err(invalid) => {
            return report::invalid(ctx, object, invalid.to_string()).await.map(|()| Action::await_change());
        }
    };
    // A first look before the presence read; the filing's own copy of the policies is checked again below.
    if !cache_keeps(ctx, &policy, &observe::namespace_policies(ctx, &policy.namespace)) {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let mut steps = Steps::start(ctx);
    let attempt = presence::fetch(ctx, &policy).await;
    steps.done("presence");
    // From here to the last write, one policy of the namespace at a time: two policies deciding on the
    // same cache could each give a Pod moving between them links the other does not see.
    let lock = ctx.namespace_lock(&policy.namespace);
    let writing = lock.lock().await;
    let caught_up = observe::caught_up(ctx, &policy.namespace);
    steps.done("wait");
    let kept = ctx.policy_state(&policy.uid);
    let mut fleet = kept.fleet.lock().await;
    // The policies the filing reads, checked again: one may have changed while this one waited.
    let policies = observe::namespace_policies(ctx, &policy.namespace);
    if !cache_keeps(ctx, &policy, &policies) {
        if let Some(attempt) = attempt {
            presence::unread(ctx, &policy, attempt).await;
        }
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let filing = Filing::new(&policy, &policies);
    let all = fleet::refresh(ctx, &policy, &filing, &policies, &mut fleet);
    steps.done("gather");
    // A read made is taken in even on a cache behind our writes: dropped, its failure (or its news) would
    // wait a poll interval. Nothing is decided on that cache.
    let read = presence::take(ctx, &policy, &mut fleet, attempt).await;
    if let Some(all) = all {
        check(ctx, &policy, &filing, &mut fleet, &all, &read);
    }
    if !caught_up {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let (observed, members) = (&fleet.observed, read.snapshot.as_ref().map(|_| fleet.membership()));
    let decision = decision(ctx, &policy, observed, members);
    if ctx.check_incremental {
        check_plan(ctx, &policy, observed, &decision);
    }
    let prompt = decision.members.is_some_and(|m| presence::awaiting(ctx, &policy, m));
    steps.done("decide");
    let outcome = match policy.mode {
        Mode::Enforce => write(ctx, &policy.namespace, &decision.waves).await,
        Mode::Observe => Outcome::default(),
    };
    drop(writing);
    steps.done("write");
    let findings = Findings::of(&policy, observed, &read, &decision, &outcome);
    let reconciled = Reconciled { observed, decision: &decision, outcome: &outcome, findings };
    report::report(ctx, object, reconciled).await?;
    steps.done("status");
    debug!(policy = policy.name, namespace = policy.namespace, patched = outcome.patched, steps = %steps, "reconciled");
    Ok(Action::requeue(next_run(&policy, &decision, &outcome, prompt)))
}

/// Whether the Pod cache keeps what the namespace's `policies` read of a Pod: this policy's node-id
/// annotation, and the label keys their selectors and topology keys read. A cache listed for less would
/// file Pods by labels it dropped.
fn cache_keeps(ctx: &Context, policy: &ValidPolicy, policies: &[Arc<MeshPolicy>]) -> bool {
    let keeps = ctx.cache_keeps(&policy.node_id_annotation) && ctx.cache_keeps_labels(policies);
    if !keeps {
        debug!(policy = policy.name, "the Pod cache is being listed for this node-id annotation or these labels");
    }
    keeps
}

/// With `--check-incremental`: the policy's kept view against one built from scratch from `all`.
fn check(ctx: &Context, policy: &ValidPolicy, filing: &Filing, fleet: &mut Fleet, all: &[Arc<CachedPod>], read: &Read) {
    let rules = read.snapshot.as_ref().map(|snap| (snap, Rules::of(policy, read.confirmed_ms)));
    if let Err(difference) = fleet.check(filing, all, rules.as_ref().map(|(s, r)| (*s, r))) {
        mismatch(ctx, policy, "view", difference);
    }
}

/// With `--check-incremental`: the plan made with the last plan's memory against one made without.
fn check_plan(ctx: &Context, policy: &ValidPolicy, o: &Observed, d: &Decision) {
    let (Some(m), Some(kept)) = (d.members, &d.plan) else { return };
    let scratch = &mut plan::Kept::default();
    let fresh = plan::targets(m, &d.held, decide::made_for(policy), (&o.carried, &o.pods), &d.health.unusable, scratch);
    let kept = PlanOutcome { targets: d.wanted.clone(), ..kept.clone() };
    let difference = match fresh {
        Ok(fresh) => match plan::difference(&kept, &fresh) {
            None => return,
            Some(difference) => difference,
        },
        Err(e) => format!("from scratch, the planner refused: {e}"),
    };
    mismatch(ctx, policy, "plan", difference);
}

/// Logs and counts a difference `--check-incremental` found in the kept `what`.
fn mismatch(ctx: &Context, policy: &ValidPolicy, what: &str, difference: String) {
    error!(policy = policy.name, namespace = policy.namespace, what, difference, "kept state differs from scratch");
    ctx.metrics.incremental_mismatches.inc();
}

/// The decide step with what it keeps of the policy from the context.
fn decision<'m>(ctx: &Context, policy: &ValidPolicy, o: &Observed, members: Option<&'m Membership>) -> Decision<'m> {
    let kept = ctx.policy_state(&policy.uid);
    let mut memory = kept.decide.lock().expect("decide lock");
    let now = Instant::now();
    memory.admission.cache_blind_until(ctx.pod_sight.blind_until(now));
    decide::decide(policy, o, members, &mut memory, now)
}

/// When to reconcile again, with no event: soon after failed writes, promptly (`prompt`) while a Ready Pod
/// waits for its presence entry, when held-back newcomers may join, else at the next poll.
fn next_run(policy: &ValidPolicy, d: &Decision, outcome: &Outcome, prompt: bool) -> Duration {
    let again = if outcome.lost_leadership || outcome.failed.values().any(|e| !e.is_stale()) {
        WRITE_RETRY
    } else if !outcome.failed.is_empty() {
        CACHE_WAIT
    } else if prompt {
        PROMPT_FETCH_INTERVAL
    } else {
        policy.rendezvous.poll_interval
    };
    d.recheck.map_or(again, |r| r.min(again))
}

/// How long each step of one reconcile took: into the step histogram, and for the debug log.
struct Steps<'a> {
    ctx: &'a Context,
    last: Instant,
    took: Vec<(&'static str, Duration)>,
}

impl<'a> Steps<'a> {
    fn start(ctx: &'a Context) -> Self {
        Self { ctx, last: Instant::now(), took: Vec::with_capacity(6) }
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        let took = now - self.last;
        self.last = now;
        self.ctx.metrics.step_duration.get_or_create(&telemetry::StepLabel { step }).observe(took.as_secs_f64());
        self.took.push((step, took));
    }
}

impl std::fmt::Display for Steps<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, took)) in self.took.iter().enumerate() {
            write!(f, "{}{step} {:.1} ms", if i > 0 { ", " } else { "" }, took.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// Apply, with leadership re-checked before each wave.
async fn write(ctx: &Context, ns: &str, waves: &Waves) -> Outcome {
    if waves.is_empty() {
        return Outcome::default();
    }
    debug!(namespace = ns, shrink = waves.shrink.len(), grow = waves.grow.len(), "writing");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    apply::apply(&pods, waves, ctx.apply_concurrency, &ctx.leadership, &ctx.expectations, &ctx.metrics.pod_patches)
        .await
}

/// The Pods a deleted policy must release, each with the target "nothing": those carrying its assignment
/// (see [`observe::observe`]), or, when its spec can no longer be read, those naming it.
fn released(ctx: &Context, object: &MeshPolicy) -> (std::collections::BTreeMap<Name, super::pods::PodState>, Targets) {
    let mut observed = match ValidPolicy::new(object) {
        Ok(policy) => observe::gather(ctx, &policy),
        Err(_) => observe::naming(ctx, object),
    };
    let targets: Targets = observed.carried.keys().map(|pod| (pod.clone(), None)).collect();
    observed.pods.retain(|pod, _| targets.contains_key(pod));
    (observed.pods, targets)
}

/// Finalizer cleanup: remove this policy's annotations from every Pod that carries them, then forget the
/// policy (its presence state and metric labels). Anything short of "every Pod released" is an error,
/// which keeps the finalizer.
async fn cleanup(object: &MeshPolicy, ctx: &Context) -> Result<Action, Error> {
    let (name, ns) = (object.name_any(), object.namespace().unwrap_or_default());
    let lock = ctx.namespace_lock(&ns);
    let _writing = lock.lock().await;
    let labels_kept = ctx.cache_keeps_labels(&observe::namespace_policies(ctx, &ns));
    if !observe::caught_up(ctx, &ns) || !labels_kept {
        return Err(CleanupError::CacheBehind.into());
    }
    let (pods, targets) = released(ctx, object);
    let waves = decide::waves(&pods, &targets, &name, &|_| None);
    let outcome = write(ctx, &ns, &waves).await;
    if !outcome.failed.is_empty() && outcome.failed.values().all(apply::WriteError::is_stale) {
        // Refused only because Pods changed since: no Warning, but an error all the same (the finalizer
        // goes only once every Pod is released), and released once the cache shows them.
        return Err(CleanupError::CacheBehind.into());
    }
    let failed = outcome.failed.len();
    if let Some((pod, source)) = outcome.failed.into_iter().next() {
        let e = CleanupError::Write { failed, pod, source };
        report::publish(ctx, object, EventType::Warning, "CleanupFailed", &e.to_string()).await;
        return Err(e.into());
    }
    if outcome.lost_leadership || !ctx.leadership.may_write() {
        return Err(CleanupError::LostLeadership.into());
    }
    ctx.forget(object);
    info!(policy = name, pods = outcome.patched, "policy deleted; assignments removed");
    Ok(Action::await_change())
}
