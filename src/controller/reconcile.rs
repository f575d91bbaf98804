//! One reconcile of one MeshPolicy: validate → gather → presence → membership → plan → decide → apply →
//! status. Validate, membership, plan and decide are pure (each in its own module); gather reads the
//! caches; presence and apply talk to the rendezvous and the API.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::admission::Admission;
use super::apply::{self, Outcome};
use super::decide::{self, PodState};
use super::membership::{self, Exclusion, Membership};
use super::plan::{self, PlanOutcome, Targets};
use super::pods::CachedPod;
use super::poll::{Attempt, PROMPT_FETCH_INTERVAL, Read};
use super::status::{self, Findings};
use super::{Context, Error, FIELD_MANAGER, FINALIZER};
use crate::api::{MeshPolicy, MeshPolicyStatus, Mode};
use crate::assignment::Assignment;
use crate::presence::{FetchError, Fetched, Request, Snapshot};
use crate::{duration, telemetry};

/// How soon a reconcile that found the caches behind (not synced yet, or older than our own writes) runs
/// again.
const CACHE_WAIT: Duration = Duration::from_millis(200);

pub async fn reconcile(policy: Arc<MeshPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leadership.may_write() {
        // Standbys keep their caches warm and write nothing; becoming leader re-runs every policy.
        return Ok(Action::await_change());
    }
    // An empty cache must not look like an empty fleet (nor a deleted policy like one without Pods).
    if !ctx.synced() {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let started = std::time::Instant::now();
    let ns = policy.namespace().unwrap_or_default();
    let api: Api<MeshPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, policy, |event| async {
        match event {
            Finalized::Apply(p) => reconcile_policy(&p, &ctx).await,
            Finalized::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    crate::memory::release();
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.get_or_create(&telemetry::ResultLabel { result: label.into() }).inc();
    result
}

pub fn error_policy(_policy: Arc<MeshPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, "reconcile error");
    ctx.metrics.reconcile_errors.get_or_create(&telemetry::KindLabel { kind: error.kind().into() }).inc();
    Action::requeue(Duration::from_secs(5))
}

/// Whether `policy` selects `pod` (same namespace, selector matches). An unusable selector selects nothing.
pub fn selects(policy: &MeshPolicy, pod: &impl Resource) -> bool {
    policy.namespace() == pod.namespace()
        && Selector::try_from(policy.spec.selector.clone()).is_ok_and(|s| s.matches(pod.labels()))
}

/// The spec's values in the units the controller uses.
pub struct Settings {
    pub poll_interval: Duration,
    pub timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub presence_url: String,
}

/// Validate: what the CRD schema already enforces, checked again so an object written before a schema
/// change, or past a disabled validation, cannot make the controller act on nonsense.
pub fn validate(policy: &MeshPolicy) -> Result<Settings, String> {
    let spec = &policy.spec;
    let dur = |field: &str, v: &str| duration::parse(v).map_err(|e| format!("spec.{field}: {e}"));
    let poll_interval = dur("rendezvous.pollInterval", &spec.rendezvous.poll_interval)?;
    let timeout = dur("rendezvous.timeout", &spec.rendezvous.timeout)?;
    let heartbeat_timeout = dur("heartbeatTimeout", &spec.heartbeat_timeout)?;
    if poll_interval < Duration::from_secs(1) {
        return Err(format!("spec.rendezvous.pollInterval: {:?} is below 1s", spec.rendezvous.poll_interval));
    }
    if spec.max_peers > crate::api::MAX_PEERS_LIMIT {
        return Err(format!("spec.maxPeers: {} exceeds {}", spec.max_peers, crate::api::MAX_PEERS_LIMIT));
    }
    let base = url::Url::parse(&spec.rendezvous.url)
        .map_err(|e| format!("spec.rendezvous.url: {:?} is not a URL: {e}", spec.rendezvous.url))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(format!("spec.rendezvous.url: {:?} is not http:// or https://", spec.rendezvous.url));
    }
    Selector::try_from(spec.selector.clone()).map_err(|e| format!("spec.selector: {e}"))?;
    // The join token goes to base URL + path: a path that does not start with '/' could change the host.
    if !spec.rendezvous.presence_path.starts_with('/') {
        return Err(format!("spec.rendezvous.presencePath: {:?} must start with '/'", spec.rendezvous.presence_path));
    }
    let presence_url = format!("{}{}", spec.rendezvous.url.trim_end_matches('/'), spec.rendezvous.presence_path);
    Ok(Settings { poll_interval, timeout, heartbeat_timeout, presence_url })
}

/// The older policy owns a Pod two policies select: creation time, then name, decide.
fn owner_key(p: &MeshPolicy) -> (Option<Timestamp>, String) {
    (p.metadata.creation_timestamp.as_ref().map(|t| t.0), p.name_any())
}

/// The selectors of `policy`'s older peers in its namespace: the older policy owns a Pod both select, so
/// only these can take one from it.
fn older_selectors(policy: &MeshPolicy, policies: &[Arc<MeshPolicy>]) -> Vec<Selector> {
    policies
        .iter()
        .filter(|p| p.namespace() == policy.namespace() && p.uid() != policy.uid())
        .filter(|p| owner_key(p) < owner_key(policy))
        .filter_map(|p| Selector::try_from(p.spec.selector.clone()).ok())
        .collect()
}

/// What the caches say about one policy's namespace.
pub struct Observed {
    /// Pods the policy selects and owns (no older policy selects them).
    pub selected: Vec<Arc<CachedPod>>,
    /// Pods it selects that an older policy owns.
    pub conflicted: Vec<String>,
    /// Every Pod of the namespace that is selected or carries any `agentmesh.dev/*` key.
    pub pods: BTreeMap<String, PodState>,
    /// What each Pod carries as this policy's.
    pub carried: BTreeMap<String, Arc<Assignment>>,
    /// Pods carrying another policy's assignment, and the node ids those link: Pod/id → that policy.
    pub foreign_pods: HashMap<String, String>,
    pub foreign_ids: HashMap<String, String>,
    /// Every Pod of the namespace (for the IPs of those not terminating, read only without presence).
    pub namespace_pods: Vec<Arc<CachedPod>>,
}

/// Gather: reads the Pod and policy caches.
fn gather(ctx: &Context, policy: &MeshPolicy) -> Observed {
    let ns = policy.namespace();
    let pods: Vec<Arc<CachedPod>> = ctx.pods.state().into_iter().filter(|p| p.namespace() == ns).collect();
    let policies: Vec<Arc<MeshPolicy>> = ctx.policies.state().into_iter().filter(|p| p.namespace() == ns).collect();
    observe(policy, &pods, &policies)
}

/// What `pods` and `policies` (of `policy`'s namespace) say about `policy`. Pure.
pub fn observe(policy: &MeshPolicy, pods: &[Arc<CachedPod>], policies: &[Arc<MeshPolicy>]) -> Observed {
    let name = policy.name_any();
    let mine = Selector::try_from(policy.spec.selector.clone()).ok();
    let older = older_selectors(policy, policies);
    let existing: HashSet<String> = policies.iter().filter(|p| p.uid() != policy.uid()).map(|p| p.name_any()).collect();
    let mut o = Observed {
        selected: vec![],
        conflicted: vec![],
        pods: BTreeMap::new(),
        carried: BTreeMap::new(),
        foreign_pods: HashMap::new(),
        foreign_ids: HashMap::new(),
        namespace_pods: pods.to_vec(),
    };
    for pod in pods {
        let pod_name = pod.name_any();
        let selected = mine.as_ref().is_some_and(|s| s.matches(pod.labels()));
        if selected {
            match older.iter().any(|s| s.matches(pod.labels())) {
                true => o.conflicted.push(pod_name.clone()),
                false => o.selected.push(pod.clone()),
            }
        }
        let mut state = pod_state(pod, &policy.spec.identity.node_id_annotation);
        // Keys naming a policy that does not exist (any more) are strays, not another policy's Pod.
        if state.keys.policy().is_some_and(|p| p != name && !existing.contains(p)) {
            state.keys = state.keys.without_policy();
        }
        match state.keys.policy() {
            Some(owner) if owner != name => {
                let theirs = state.keys.lenient().unwrap_or_default();
                o.foreign_ids.extend(theirs.linked_ids().into_iter().map(|id| (id.to_owned(), owner.to_owned())));
                o.foreign_pods.insert(pod_name, owner.to_owned());
                continue;
            }
            _ => {}
        }
        if let Some(a) = state.carried(&name, selected) {
            o.carried.insert(pod_name.clone(), a);
        }
        if selected || !state.keys.is_empty() {
            o.pods.insert(pod_name, state);
        }
    }
    o.conflicted.sort();
    o
}

fn pod_state(pod: &CachedPod, node_id_annotation: &str) -> PodState {
    PodState {
        uid: pod.uid(),
        resource_version: pod.resource_version(),
        node_id: pod.annotation(node_id_annotation).map(str::to_owned),
        keys: pod.keys.clone(),
    }
}

async fn reconcile_policy(policy: &MeshPolicy, ctx: &Context) -> Result<Action, Error> {
    let settings = match validate(policy) {
        Ok(s) => s,
        Err(message) => return invalid(ctx, policy, message).await,
    };
    let ns = policy.namespace().unwrap_or_default();
    let annotation = &policy.spec.identity.node_id_annotation;
    if !ctx.cache_keeps(annotation) {
        debug!(policy = policy.name_any(), annotation, "the Pod cache is being listed for this node-id annotation");
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let mut steps = Steps::start(ctx);
    let attempt = fetch_presence(ctx, policy, &settings).await;
    steps.done("presence");
    // From here to the last write, one policy of the namespace at a time: two policies deciding on the
    // same cache could each give a Pod moving between them links the other does not see.
    let lock = ctx.namespace_lock(&ns);
    let writing = lock.lock().await;
    if !caught_up(ctx, &ns) {
        // A read made is taken in all the same: dropped, its failure (or its news) would wait a poll interval.
        if attempt.is_some() {
            take_presence(ctx, policy, &settings, &gather(ctx, policy), attempt).await;
        }
        return Ok(Action::requeue(CACHE_WAIT));
    }
    steps.done("wait");
    let mut observed = gather(ctx, policy);
    steps.done("gather");
    let (read, worked) = take_presence(ctx, policy, &settings, &observed, attempt).await;
    let node_domain = |node: &str| node_domain(ctx, policy, node);
    let membership = read.snapshot.as_deref().map(|snap| {
        worked.unwrap_or_else(|| members(policy, &settings, &observed, snap, read.confirmed_ms, &node_domain))
    });
    let mut findings = Findings {
        mode: policy.spec.mode,
        has_presence: read.snapshot.is_some(),
        unreachable: read.failure.clone(),
        suspect: read.suspect.clone(),
        conflicted: observed.conflicted.clone(),
        ..Default::default()
    };
    let uid = policy.uid().unwrap_or_default();
    let mut admission = ctx.admissions.lock().expect("admission map lock").remove(&uid).unwrap_or_default();
    let now = std::time::Instant::now();
    let Decision { members, plan: targets, plan_error, wanted, waves, recheck } =
        decide_policy(policy, &mut observed, membership, (&mut admission, now));
    ctx.admissions.lock().expect("admission map lock").insert(uid, admission);
    steps.done("decide");
    findings.plan_error = plan_error;
    let prompt = members.as_ref().is_some_and(|m| awaiting_presence(ctx, policy, m));
    if !waves.is_empty() {
        let (shrink, grow) = (waves.shrink.len(), waves.grow.len());
        debug!(
            policy = policy.name_any(),
            namespace = ns,
            shrink,
            grow,
            agents = members.as_ref().map(|m| m.agents.len()),
            "writing"
        );
    }
    let outcome = match policy.spec.mode {
        Mode::Enforce => write(ctx, &ns, &waves).await,
        Mode::Observe => Outcome::default(),
    };
    drop(writing);
    steps.done("write");
    findings.write_failures = outcome.failed.clone();
    findings.held = outcome.held.len();
    if let Some(m) = &members {
        findings.arriving = m.excluded.values().filter(|e| **e == Exclusion::Arriving).count();
        findings.duplicate_ids = duplicate_ids(m);
        findings.disconnected = targets.as_ref().is_some_and(|p| p.components > 1 && policy.spec.max_peers >= 2);
    }
    report(ctx, policy, &observed, members.as_ref(), targets.as_ref(), &wanted, &findings, &outcome).await?;
    steps.done("status");
    debug!(policy = policy.name_any(), namespace = ns, patched = outcome.patched, steps = %steps, "reconciled");
    let again = if !outcome.failed.is_empty() || outcome.lost_leadership {
        Duration::from_secs(2)
    } else if prompt {
        PROMPT_FETCH_INTERVAL
    } else {
        settings.poll_interval
    };
    Ok(Action::requeue(recheck.map_or(again, |r| r.min(again))))
}

/// How long each step of one reconcile took: into the step histogram, and for the debug log.
struct Steps<'a> {
    ctx: &'a Context,
    last: std::time::Instant,
    took: Vec<(&'static str, Duration)>,
}

impl<'a> Steps<'a> {
    fn start(ctx: &'a Context) -> Self {
        Self { ctx, last: std::time::Instant::now(), took: Vec::with_capacity(6) }
    }

    fn done(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
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

/// With no presence (or no plan), what the Pods already carry stays, minus what is gone; with presence but
/// no plan (the planner refused), nothing changes.
fn adopted(o: &Observed, has_presence: bool, cap: u32) -> Targets {
    if has_presence {
        return Targets::new();
    }
    let staying: HashSet<String> =
        o.selected.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).map(|p| p.name_any()).collect();
    let live_ips: HashSet<String> =
        o.namespace_pods.iter().filter(|p| !p.terminating()).filter_map(|p| p.pod_ip.clone()).collect();
    plan::adopt(&o.carried, &o.pods, &staying, &live_ips, cap)
}

/// What one reconcile decides, before any write.
pub struct Decision {
    pub members: Option<Membership>,
    pub plan: Option<PlanOutcome>,
    pub plan_error: Option<String>,
    /// The targets of the Pods not carrying theirs: the plan's, or without one what the Pods carry (see
    /// [`adopted`]).
    pub wanted: Targets,
    pub waves: decide::Waves,
    /// When newcomers held back by admission may join.
    pub recheck: Option<Duration>,
}

/// The pure core of a reconcile: admission, the plan, the targets and the writes that reach them, from the
/// membership presence gives (`None` without presence; see [`members`]).
pub fn decide_policy(
    policy: &MeshPolicy,
    observed: &mut Observed,
    mut members: Option<Membership>,
    (admission, now): (&mut Admission, std::time::Instant),
) -> Decision {
    let recheck = members.as_mut().and_then(|m| admit(m, observed, admission, now));
    for agent in members.iter().flat_map(|m| &m.agents) {
        if let Some(state) = observed.pods.get_mut(&agent.pod) {
            state.node_id = Some(agent.node_id.clone());
        }
    }
    let planned = members.as_ref().map(|m| {
        let seed = policy.uid().unwrap_or_default();
        plan::plan(m, policy.spec.max_peers, &seed, &policy.name_any(), &observed.carried, &observed.pods)
    });
    let (mut plan, plan_error) = match planned {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => (None, Some(e.to_string())),
        None => (None, None),
    };
    let wanted = match plan.as_mut() {
        Some(p) => std::mem::take(&mut p.targets),
        None => adopted(observed, members.is_some(), policy.spec.max_peers),
    };
    let waves = decide::waves(&observed.pods, &wanted, &policy.name_any());
    Decision { members, plan, plan_error, wanted, waves, recheck }
}

/// Holds back the newcomers of a burst (see [`super::admission`]); when to look again.
fn admit(m: &mut Membership, o: &Observed, admission: &mut Admission, now: std::time::Instant) -> Option<Duration> {
    let eligible: Vec<&str> = m.agents.iter().map(|a| a.pod.as_str()).collect();
    let (held, recheck) = admission.hold(&eligible, &|pod| o.carried.contains_key(pod), now);
    if !held.is_empty() {
        m.agents.retain(|a| !held.contains(&a.pod));
        m.excluded.extend(held.into_iter().map(|pod| (pod, Exclusion::Arriving)));
    }
    recheck
}

/// The `topologyKey` label of Node `node`, from the Node cache.
fn node_domain(ctx: &Context, policy: &MeshPolicy, node: &str) -> Option<String> {
    let key = policy.spec.topology_key.as_deref()?;
    let meta = ctx.nodes.get(&kube::runtime::reflector::ObjectRef::new(node))?;
    meta.labels().get(key).cloned()
}

/// Membership: the eligible agents under `snap` judged on `confirmed_ms`, without those another policy
/// still holds. `node_domain` is a Node's `topologyKey` label.
pub fn members(
    policy: &MeshPolicy,
    settings: &Settings,
    o: &Observed,
    snap: &Snapshot,
    confirmed_ms: f64,
    node_domain: &dyn Fn(&str) -> Option<String>,
) -> Membership {
    let rules = membership::Rules {
        node_id_annotation: &policy.spec.identity.node_id_annotation,
        topology_key: policy.spec.topology_key.as_deref(),
        heartbeat_timeout: settings.heartbeat_timeout,
        fallback_now_ms: confirmed_ms,
    };
    let selected: Vec<&CachedPod> = o.selected.iter().map(|p| p.as_ref()).collect();
    let mut m = membership::decide(&selected, snap, &rules, node_domain);
    membership::exclude_foreign(&mut m, &o.foreign_pods, &o.foreign_ids);
    m
}

fn duplicate_ids(m: &Membership) -> Vec<String> {
    let set: BTreeSet<String> = m
        .excluded
        .values()
        .filter(|e| matches!(e, Exclusion::DuplicateNodeId { .. }))
        .map(|e| status::truncate(&e.to_string(), 256))
        .collect();
    set.into_iter().collect()
}

/// Whether the cache shows every write this process made in `ns`.
fn caught_up(ctx: &Context, ns: &str) -> bool {
    ctx.expectations.caught_up(ns, &|pod| {
        let cached = ctx.pods.get(&kube::runtime::reflector::ObjectRef::new(pod).within(ns))?;
        Some((cached.uid(), cached.resource_version()))
    })
}

/// Apply, with leadership re-checked before each wave.
async fn write(ctx: &Context, ns: &str, waves: &decide::Waves) -> Outcome {
    if waves.is_empty() {
        return Outcome::default();
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    apply::apply(&pods, waves, ctx.apply_concurrency, &ctx.leadership, &ctx.expectations, &ctx.metrics.pod_patches)
        .await
}

async fn invalid(ctx: &Context, policy: &MeshPolicy, message: String) -> Result<Action, Error> {
    publish(ctx, policy, EventType::Warning, "InvalidPolicy", &message).await;
    let verdicts = [status::Verdict::new(status::READY, false, "InvalidPolicy", message)];
    write_status(ctx, policy, MeshPolicyStatus::default(), &verdicts).await?;
    Ok(Action::await_change())
}

/// Status: counts, the plan's shape, conditions; Events on what changed.
#[allow(clippy::too_many_arguments)]
async fn report(
    ctx: &Context,
    policy: &MeshPolicy,
    o: &Observed,
    members: Option<&Membership>,
    plan: Option<&PlanOutcome>,
    wanted: &Targets,
    findings: &Findings,
    outcome: &Outcome,
) -> Result<(), Error> {
    let label = telemetry::PolicyLabel { namespace: policy.namespace().unwrap_or_default(), policy: policy.name_any() };
    ctx.metrics.agents.get_or_create(&label).set(o.selected.len() as i64);
    let prev = policy.status.clone().unwrap_or_default();
    let mut new = MeshPolicyStatus { selected: o.selected.len() as u32, ..prev.clone() };
    // Agents already carrying their plan have no target (see [`plan::plan`]); the others count once written.
    new.assigned = plan.map_or(0, |p| p.settled)
        + wanted
            .iter()
            .filter(|(pod, t)| {
                let carried = || t.as_ref().is_some_and(|a| o.pods.get(*pod).is_some_and(|s| s.carries(a)));
                t.is_some() && (carried() || outcome.reached(pod))
            })
            .count() as u32;
    if let (Some(m), Some(plan)) = (members, plan) {
        new.eligible = m.agents.len() as u32;
        new.links = plan.links;
        new.max_degree = plan.max_degree;
        new.min_degree = plan.min_degree;
        new.components = plan.components;
        new.plan_hash = Some(plan.hash.clone());
        new.excluded = m
            .excluded
            .iter()
            .take(100)
            .map(|(pod, why)| crate::api::ExcludedPod {
                pod: pod.clone(),
                reason: status::truncate(&why.to_string(), 256),
            })
            .collect();
        if prev.plan_hash.as_ref() != Some(&plan.hash) {
            new.last_plan_time = Some(Time(Timestamp::now()));
            let note = format!(
                "{} agents, {} links, degree {}..{}, {} Pods patched{}",
                m.agents.len(),
                plan.links,
                plan.min_degree,
                plan.max_degree,
                outcome.patched,
                if policy.spec.mode == Mode::Observe { " (Observe: none patched)" } else { "" }
            );
            publish(ctx, policy, EventType::Normal, "PlanChanged", &note).await;
        }
        ctx.metrics.eligible.get_or_create(&label).set(m.agents.len() as i64);
        ctx.metrics.links.get_or_create(&label).set(plan.links as i64);
        ctx.metrics.max_links.get_or_create(&label).set(plan.max_degree as i64);
    }
    warn_on_transitions(ctx, policy, &prev, findings).await;
    write_status(ctx, policy, new, &findings.verdicts()).await
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
    api.patch_status(&policy.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

async fn publish(ctx: &Context, policy: &MeshPolicy, type_: EventType, reason: &str, note: &str) {
    // events.k8s.io caps a note at 1 kB.
    let note = status::truncate(note, 1000);
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish an Event");
    }
}

/// Whether a Ready Pod without presence began waiting recently (worth a prompt re-read).
fn awaiting_presence(ctx: &Context, policy: &MeshPolicy, m: &Membership) -> bool {
    let unmatched: HashSet<String> =
        m.excluded.iter().filter(|(_, e)| **e == Exclusion::NoPresence).map(|(pod, _)| pod.clone()).collect();
    match ctx.presence_state(&policy.uid().unwrap_or_default()).try_lock() {
        Ok(mut state) => state.awaiting(&unmatched, std::time::Instant::now()),
        Err(_) => false,
    }
}

/// Reads presence when due: every poll interval, and promptly while a Ready Pod waits for its entry. The
/// read is taken in (see [`take_presence`]) against the same observation the reconcile decides on.
async fn fetch_presence(ctx: &Context, policy: &MeshPolicy, settings: &Settings) -> Option<Attempt> {
    let state = ctx.presence_state(&policy.uid().unwrap_or_default());
    let mut state = state.lock().await;
    state.enter_term(ctx.leadership.term());
    let now = std::time::Instant::now();
    let fresh = || {
        let since = state.last_attempt.map(|t| now.saturating_duration_since(t));
        since.is_some_and(|s| s >= FRESH_FETCH_INTERVAL)
            && state.snapshot.as_deref().is_some_and(|snap| newly_unmatched(ctx, policy, snap, &state.waiting))
    };
    if !(state.due(settings.poll_interval, state.prompt(now), now) || fresh()) {
        return None;
    }
    state.last_attempt = Some(std::time::Instant::now());
    let started = std::time::Instant::now();
    let result = fetch(ctx, policy, settings, state.etag.as_deref()).await;
    ctx.metrics.presence_duration.observe(started.elapsed().as_secs_f64());
    count_fetch(ctx, policy, &result);
    Some(Attempt { result, heartbeat_timeout: settings.heartbeat_timeout })
}

/// Takes in `attempt` (see [`super::poll`] for what is kept and trusted) and returns what presence says
/// now, with the membership it gives `o` when that was already worked out on the way.
async fn take_presence(
    ctx: &Context,
    policy: &MeshPolicy,
    settings: &Settings,
    o: &Observed,
    attempt: Option<Attempt>,
) -> (Read, Option<Membership>) {
    let state = ctx.presence_state(&policy.uid().unwrap_or_default());
    let mut state = state.lock().await;
    state.enter_term(ctx.leadership.term());
    let Some(attempt) = attempt else { return (state.read(), None) };
    let node_domain = |node: &str| node_domain(ctx, policy, node);
    // Each membership worked out while judging the read, by snapshot: the one taken in is decided on next.
    let worked: std::cell::RefCell<Vec<(Arc<Snapshot>, f64, Membership)>> = Default::default();
    let eligible = |snap: &Arc<Snapshot>, clock: f64| -> BTreeMap<String, String> {
        let m = members(policy, settings, o, snap, clock, &node_domain);
        let eligible = m.agents.iter().map(|a| (a.pod.clone(), a.node_id.clone())).collect();
        worked.borrow_mut().push((snap.clone(), clock, m));
        eligible
    };
    let assigned: BTreeSet<String> =
        o.selected.iter().map(|p| p.name_any()).filter(|p| o.carried.contains_key(p)).collect();
    state.take(attempt, &eligible, &assigned);
    let read = state.read();
    let membership = read.snapshot.as_ref().and_then(|taken| {
        let worked = worked.into_inner().into_iter();
        worked.filter(|(snap, clock, _)| Arc::ptr_eq(snap, taken) && *clock == read.confirmed_ms).map(|w| w.2).last()
    });
    (read, membership)
}

/// A Pod that just became Ready without a presence entry gets a read at once (but no more often than
/// this): an agent usually registers before its readiness probe passes, so the entry is likely there.
const FRESH_FETCH_INTERVAL: Duration = Duration::from_millis(50);

/// Whether a selected, Ready Pod without an assignment, not yet known to wait, has no entry in `snap`.
fn newly_unmatched(
    ctx: &Context,
    policy: &MeshPolicy,
    snap: &Snapshot,
    waiting: &HashMap<String, std::time::Instant>,
) -> bool {
    let Ok(selector) = Selector::try_from(policy.spec.selector.clone()) else { return false };
    let ns = policy.namespace();
    // Pods an older policy owns are never this one's agents: they must not read presence again and again.
    let older = older_selectors(policy, &ctx.policies.state());
    let candidates: Vec<Arc<CachedPod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace() == ns && p.ready && !p.terminating() && p.keys.exact().is_none())
        .filter(|p| !waiting.contains_key(p.metadata.name.as_deref().unwrap_or_default()))
        .filter(|p| selector.matches(p.labels()) && !older.iter().any(|o| o.matches(p.labels())))
        .collect();
    if candidates.is_empty() {
        return false;
    }
    let annotation = &policy.spec.identity.node_id_annotation;
    let ids: HashSet<&str> = snap.nodes.iter().map(|n| n.node_id.as_str()).collect();
    // Pods matched by hostname or IP instead are left to the prompt reads.
    candidates.iter().any(|p| p.annotation(annotation).is_some_and(|id| !ids.contains(id)))
}

fn count_fetch(ctx: &Context, policy: &MeshPolicy, result: &Result<Fetched, FetchError>) {
    let label = |r: &str| telemetry::ResultLabel { result: r.into() };
    match result {
        Ok(Fetched::New { bytes, .. }) => {
            ctx.metrics.presence_bytes.inc_by(*bytes as u64);
            ctx.metrics.presence_fetches.get_or_create(&label("ok")).inc();
        }
        Ok(Fetched::NotModified) => {
            ctx.metrics.presence_fetches.get_or_create(&label("not_modified")).inc();
        }
        Err(e) => {
            ctx.metrics.presence_fetches.get_or_create(&label("error")).inc();
            ctx.metrics.presence_errors.get_or_create(&telemetry::KindLabel { kind: e.reason().into() }).inc();
            info!(policy = policy.name_any(), reason = e.reason(), error = %e, "presence unavailable; keeping the last snapshot");
        }
    }
}

async fn fetch(
    ctx: &Context,
    policy: &MeshPolicy,
    settings: &Settings,
    etag: Option<&str>,
) -> Result<Fetched, FetchError> {
    let token = match &policy.spec.rendezvous.join_token_secret_ref {
        None => None,
        Some(r) => Some(join_token(ctx, policy, &r.name, &r.key).await?),
    };
    let req = Request {
        url: &settings.presence_url,
        token: token.as_deref(),
        ca_bundle: policy.spec.rendezvous.ca_bundle.as_deref(),
        timeout: settings.timeout,
        etag,
    };
    ctx.fetcher.fetch(&req).await
}

/// The Secret annotation that lists the rendezvous URLs its token may be sent to (comma or space
/// separated): whoever may edit a MeshPolicy must not be able to send a Secret they cannot read anywhere.
pub const ALLOWED_URLS_ANNOTATION: &str = "agentmesh.dev/rendezvous-urls";

/// The join token, if the Secret exists, holds the key, and allows the policy's rendezvous URL.
async fn join_token(ctx: &Context, policy: &MeshPolicy, name: &str, key: &str) -> Result<String, FetchError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    let secret = secrets.get(name).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 404 => FetchError::Token(format!("Secret {name:?} not found")),
        other => FetchError::Token(format!("reading Secret {name:?}: {other}")),
    })?;
    let url = policy.spec.rendezvous.url.trim_end_matches('/');
    let allowed = secret.annotations().get(ALLOWED_URLS_ANNOTATION).is_some_and(|list| {
        list.split([',', ' ', '\n']).map(|u| u.trim().trim_end_matches('/')).any(|u| !u.is_empty() && u == url)
    });
    if !allowed {
        return Err(FetchError::Token(format!(
            "Secret {name:?} does not allow its token to be sent to {url:?}: list that URL in its annotation {ALLOWED_URLS_ANNOTATION}"
        )));
    }
    let bytes = secret
        .data
        .and_then(|mut d| d.remove(key))
        .ok_or_else(|| FetchError::Token(format!("Secret {name:?} has no key {key:?}")))?;
    String::from_utf8(bytes.0)
        .map(|t| t.trim().to_owned())
        .map_err(|_| FetchError::Token(format!("Secret {name:?} key {key:?} is not UTF-8")))
}

/// Finalizer cleanup: remove this policy's annotations from every Pod that carries them, then forget the
/// policy (its presence state and metric labels).
async fn cleanup(policy: &MeshPolicy, ctx: &Context) -> Result<Action, Error> {
    let ns = policy.namespace().unwrap_or_default();
    let lock = ctx.namespace_lock(&ns);
    let _writing = lock.lock().await;
    // Ok would remove the finalizer: anything short of "every Pod released" is an error.
    if !caught_up(ctx, &ns) {
        return Err(Error::Cleanup("the Pod cache does not show our latest writes yet".into()));
    }
    let observed = gather(ctx, policy);
    let targets: Targets = observed.carried.keys().map(|pod| (pod.clone(), None)).collect();
    let waves = decide::waves(&observed.pods, &targets, &policy.name_any());
    let outcome = write(ctx, &ns, &waves).await;
    // Any error keeps the finalizer: the policy goes only once its Pods carry nothing of it.
    if let Some(note) = (Findings { write_failures: outcome.failed.clone(), ..Default::default() }).write_failure_note()
    {
        publish(ctx, policy, EventType::Warning, "CleanupFailed", &note).await;
        return Err(Error::Cleanup(note));
    }
    if outcome.lost_leadership {
        return Err(Error::Cleanup("leadership lost before the assignments were removed".into()));
    }
    if !ctx.leadership.may_write() {
        return Err(Error::Cleanup("leadership lost before the finalizer could be removed".into()));
    }
    ctx.forget(policy);
    info!(policy = policy.name_any(), pods = outcome.patched, "policy deleted; assignments removed");
    Ok(Action::await_change())
}
