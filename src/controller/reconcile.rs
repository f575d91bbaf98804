//! One reconcile of one MeshPolicy, in phases: gather → validate → membership → plan → diff → apply →
//! status. Validate, membership, plan and diff are pure; gather and apply talk to the API and the
//! rendezvous.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
use tracing::{info, warn};

use super::apply::{self, Assignment};
use super::membership::{self, Exclusion, Membership, Peer};
use super::status::{self, Verdict};
use super::{Context, Error, FIELD_MANAGER, FINALIZER, PresenceState};
use crate::api::{MeshPolicy, MeshPolicyStatus, Mode, POLICY_ANNOTATION};
use crate::planner::{self, analysis};
use crate::presence::{FetchError, Fetched, Request, Snapshot, unix_ms as now_ms};
use crate::{duration, telemetry};

pub async fn reconcile(policy: Arc<MeshPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leader.load(Ordering::SeqCst) {
        // Standbys keep their caches warm and write nothing; becoming leader re-runs every policy.
        return Ok(Action::await_change());
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
pub fn selects(policy: &MeshPolicy, pod: &Pod) -> bool {
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
    let presence_url = format!("{}{}", spec.rendezvous.url.trim_end_matches('/'), spec.rendezvous.presence_path);
    Ok(Settings { poll_interval, timeout, heartbeat_timeout, presence_url })
}

/// The older policy owns a Pod two policies select: creation time, then name, decide.
fn owner_key(p: &MeshPolicy) -> (Option<Timestamp>, String) {
    (p.metadata.creation_timestamp.as_ref().map(|t| t.0), p.name_any())
}

async fn reconcile_policy(policy: &MeshPolicy, ctx: &Context) -> Result<Action, Error> {
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let uid = policy.uid().unwrap_or_default();

    // validate
    let settings = match validate(policy) {
        Ok(s) => s,
        Err(message) => {
            publish(ctx, policy, EventType::Warning, "InvalidPolicy", &message).await;
            let verdicts = [Verdict::new(status::READY, false, "InvalidPolicy", message)];
            write_status(ctx, policy, MeshPolicyStatus::default(), &verdicts).await?;
            return Ok(Action::await_change());
        }
    };

    // gather: the Pods this policy selects and owns, and the ones another (older) policy owns
    let all_pods = ctx.pods.state();
    let others: Vec<Arc<MeshPolicy>> = ctx
        .policies
        .state()
        .into_iter()
        .filter(|p| p.namespace() == policy.namespace() && p.uid() != policy.uid())
        .collect();
    let mut selected: Vec<&Pod> = Vec::new();
    let mut conflicted: Vec<String> = Vec::new();
    for pod in all_pods.iter().filter(|p| selects(policy, p)) {
        let older = others.iter().find(|o| owner_key(o) < owner_key(policy) && selects(o, pod));
        match older {
            Some(_) => conflicted.push(pod.name_any()),
            None => selected.push(pod),
        }
    }
    conflicted.sort();

    // presence: poll when due, or at once when a Ready Pod has no presence yet
    let Read { snapshot: snap, confirmed_ms, failure } = presence(ctx, policy, &uid, &settings, &selected).await;

    // membership
    let node_domain = |node: &str| -> Option<String> {
        let key = policy.spec.topology_key.as_deref()?;
        let meta = ctx.nodes.get(&kube::runtime::reflector::ObjectRef::new(node))?;
        meta.labels().get(key).cloned()
    };
    let rules = membership::Rules {
        node_id_annotation: &policy.spec.identity.node_id_annotation,
        topology_key: policy.spec.topology_key.as_deref(),
        heartbeat_timeout: settings.heartbeat_timeout,
        fallback_now_ms: confirmed_ms,
    };
    let members = snap.as_ref().map(|s| membership::decide(&selected, s, &rules, &node_domain));
    let prompt = match &members {
        Some(m) => presence_state(ctx, &uid).lock().await.awaiting_presence(&no_presence(m), std::time::Instant::now()),
        None => false,
    };

    // plan: seeded by the policy's UID, stable against what the Pods carry now
    let now_assigned: BTreeMap<String, Option<Assignment>> = all_pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .map(|p| (p.name_any(), apply::current(p)))
        .collect();
    let planned = members.as_ref().map(|m| plan(policy, m, &now_assigned, &uid));

    // diff + apply: only with a snapshot (an outage before the first poll must not strip anything)
    let mut patched = 0;
    let mut want: BTreeMap<String, Option<Assignment>> = BTreeMap::new();
    if let (Some(m), Some(plan)) = (&members, &planned) {
        let agents: HashMap<&str, &membership::Agent> = m.agents.iter().map(|a| (a.pod.as_str(), a)).collect();
        for pod in all_pods.iter().filter(|p| p.namespace().as_deref() == Some(ns.as_str())) {
            let pod_name = pod.name_any();
            let ours = now_assigned.get(&pod_name).cloned().flatten().is_some_and(|a| a.policy == name);
            if let Some(agent) = agents.get(pod_name.as_str()) {
                want.insert(pod_name, plan.assignments.get(&agent.node_id).cloned());
            } else if ours {
                want.insert(pod_name, None);
            }
        }
        let changes = apply::diff(&now_assigned, &want, &uids(&all_pods, &ns));
        if policy.spec.mode == Mode::Enforce && !changes.is_empty() {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let result = apply::apply(&pods, &changes, ctx.apply_concurrency).await;
            let done = match &result {
                Ok(n) => *n,
                Err(_) => 0,
            };
            ctx.metrics.pod_patches.inc_by(done as u64);
            patched = done;
            result?;
        }
    }

    // status
    let label = telemetry::PolicyLabel { namespace: ns.clone(), policy: name.clone() };
    ctx.metrics.agents.get_or_create(&label).set(selected.len() as i64);
    let mut new = MeshPolicyStatus { selected: selected.len() as u32, ..Default::default() };
    let prev = policy.status.clone().unwrap_or_default();
    if let (Some(m), Some(plan)) = (&members, &planned) {
        new.eligible = m.agents.len() as u32;
        new.assigned = m.agents.iter().filter(|a| plan.assignments.contains_key(&a.node_id)).count() as u32;
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
        new.last_plan_time = if prev.plan_hash.as_ref() == Some(&plan.hash) {
            prev.last_plan_time.clone()
        } else {
            Some(Time(Timestamp::now()))
        };
        ctx.metrics.eligible.get_or_create(&label).set(m.agents.len() as i64);
        ctx.metrics.links.get_or_create(&label).set(plan.links as i64);
        ctx.metrics.max_links.get_or_create(&label).set(plan.max_degree as i64);
        if prev.plan_hash.as_ref() != Some(&plan.hash) {
            let note = format!(
                "{} agents, {} links, degree {}..{}, {} Pods patched{}",
                m.agents.len(),
                plan.links,
                plan.min_degree,
                plan.max_degree,
                patched,
                if policy.spec.mode == Mode::Observe { " (Observe: none patched)" } else { "" }
            );
            publish(ctx, policy, EventType::Normal, "PlanChanged", &note).await;
        }
    } else {
        // Never reached the rendezvous: keep reporting the last plan's numbers.
        new = MeshPolicyStatus {
            selected: selected.len() as u32,
            conditions: vec![],
            observed_generation: None,
            ..prev.clone()
        };
    }
    let verdicts = verdicts(policy, &members, planned.as_ref(), &failure, &conflicted);
    let was_reachable =
        prev.conditions.iter().find(|c| c.type_ == status::RENDEZVOUS_REACHABLE).map(|c| c.status == "True");
    if let Some((reason, message)) = &failure
        && was_reachable != Some(false)
    {
        publish(ctx, policy, EventType::Warning, "RendezvousUnreachable", &format!("{reason}: {message}")).await;
    }
    let had_conflict = prev.conditions.iter().any(|c| c.type_ == status::CONFLICT && c.status == "True");
    if !conflicted.is_empty() && !had_conflict {
        let note = format!("Pods selected by an older MeshPolicy: {}", conflicted.join(", "));
        publish(ctx, policy, EventType::Warning, "Conflict", &note).await;
    }
    write_status(ctx, policy, new, &verdicts).await?;
    // A Ready Pod still waiting for its presence entry: read again soon, not at the next poll.
    Ok(Action::requeue(if prompt { PROMPT_FETCH_INTERVAL } else { settings.poll_interval }))
}

/// A plan in the form the controller publishes.
pub struct PlanOutcome {
    /// Node id → the assignment its Pod should carry.
    pub assignments: HashMap<String, Assignment>,
    pub links: u32,
    pub max_degree: u32,
    pub min_degree: u32,
    pub components: u32,
    pub hash: String,
}

fn plan(policy: &MeshPolicy, m: &Membership, now: &BTreeMap<String, Option<Assignment>>, uid: &str) -> PlanOutcome {
    let name = policy.name_any();
    let members: Vec<planner::Member> =
        m.agents.iter().map(|a| planner::Member { node_id: a.node_id.clone(), domain: a.domain.clone() }).collect();
    let previous: planner::Assignment = m
        .agents
        .iter()
        .filter_map(|a| {
            let cur = now.get(&a.pod)?.as_ref().filter(|c| c.policy == name)?;
            Some((a.node_id.clone(), cur.peers.iter().map(|p| p.node_id.clone()).collect()))
        })
        .collect();
    // Membership rules out duplicates and empty ids, and the CRD bounds the cap: planning cannot fail.
    let plan = planner::plan(&members, policy.spec.max_peers, uid, &previous).expect("membership yields valid input");
    let url: HashMap<&str, &str> = m.agents.iter().map(|a| (a.node_id.as_str(), a.url.as_str())).collect();
    let assignments: HashMap<String, Assignment> = (0..members.len())
        .map(|i| {
            let peers = plan
                .dial_ids(i)
                .into_iter()
                .map(|id| Peer { node_id: id.to_owned(), url: url[id].to_owned() })
                .collect();
            (members[i].node_id.clone(), Assignment { peers, links: plan.links(i), policy: name.clone() })
        })
        .collect();
    let adj = analysis::adjacency(&plan.dial_lists());
    let degrees = analysis::links(&adj);
    let mut hashed: Vec<(&String, &Vec<Peer>)> = assignments.iter().map(|(k, v)| (k, &v.peers)).collect();
    hashed.sort();
    let hash =
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(serde_json::to_string(&hashed).unwrap_or_default().as_bytes()));
    PlanOutcome {
        links: plan.graph().edge_count() as u32,
        max_degree: degrees.iter().copied().max().unwrap_or(0) as u32,
        min_degree: degrees.iter().copied().min().unwrap_or(0) as u32,
        components: analysis::component_sizes(&adj, &vec![false; members.len()]).len() as u32,
        assignments,
        hash,
    }
}

/// The four conditions, from what the phases found.
fn verdicts(
    policy: &MeshPolicy,
    members: &Option<Membership>,
    plan: Option<&PlanOutcome>,
    failure: &Option<(String, String)>,
    conflicted: &[String],
) -> Vec<Verdict> {
    let mut v = Vec::new();
    v.push(match failure {
        Some((reason, message)) => Verdict::new(status::RENDEZVOUS_REACHABLE, false, reason.clone(), message.clone()),
        None => Verdict::new(status::RENDEZVOUS_REACHABLE, true, "PresenceRead", "presence read from the rendezvous"),
    });
    let duplicates: Vec<String> = members
        .iter()
        .flat_map(|m| m.excluded.values())
        .filter_map(|e| match e {
            Exclusion::DuplicateNodeId { .. } => Some(e.to_string()),
            _ => None,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let degraded = if members.is_none() {
        Verdict::new(status::DEGRADED, true, "NoPresence", "no presence has been read yet; no Pod is changed")
    } else if failure.is_some() {
        Verdict::new(status::DEGRADED, true, "StalePresence", "planning from the last presence read before the outage")
    } else if !duplicates.is_empty() {
        Verdict::new(status::DEGRADED, true, "DuplicateNodeId", duplicates.join("; "))
    } else if plan.is_some_and(|p| p.components > 1 && policy.spec.max_peers >= 2) {
        Verdict::new(status::DEGRADED, true, "Disconnected", "the planned mesh has more than one component")
    } else {
        Verdict::new(status::DEGRADED, false, "AsPlanned", "")
    };
    v.push(degraded);
    v.push(if conflicted.is_empty() {
        Verdict::new(status::CONFLICT, false, "NoConflict", "")
    } else {
        Verdict::new(
            status::CONFLICT,
            true,
            "SelectedByOlderPolicy",
            format!("Pods owned by an older MeshPolicy: {}", conflicted.join(", ")),
        )
    });
    v.push(match (members, policy.spec.mode) {
        (None, _) => Verdict::new(status::READY, false, "NoPresence", "waiting for the first presence read"),
        (Some(_), Mode::Observe) => {
            Verdict::new(status::READY, true, "Observed", "planned; Observe mode patches no Pod")
        }
        (Some(_), Mode::Enforce) => {
            Verdict::new(status::READY, true, "Applied", "every eligible agent carries its assignment")
        }
    });
    v
}

async fn write_status(
    ctx: &Context,
    policy: &MeshPolicy,
    mut new: MeshPolicyStatus,
    verdicts: &[Verdict],
) -> Result<(), Error> {
    let prev = policy.status.clone().unwrap_or_default();
    new.observed_generation = policy.metadata.generation;
    new.conditions =
        status::conditions(verdicts, &prev.conditions, policy.metadata.generation, &Time(Timestamp::now()));
    if new == prev {
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

/// How soon presence is read again while a Ready Pod has none: a new agent registers with the rendezvous
/// about when it turns Ready, and waits for this at most. See [`PresenceState::awaiting_presence`].
const PROMPT_FETCH_INTERVAL: Duration = Duration::from_millis(250);

/// Reads presence when due: every poll interval, and promptly while a Ready Pod waits for its entry. On
/// failure the last good snapshot stays, judged on its own clock.
async fn presence(ctx: &Context, policy: &MeshPolicy, uid: &str, settings: &Settings, selected: &[&Pod]) -> Read {
    let state = presence_state(ctx, uid);
    let mut guard = state.lock().await;
    let state = &mut *guard;
    let since = state.last_attempt.map(|t| t.elapsed());
    // Judged on the snapshot held so far: a Pod that turned Ready since the last read is read for at once.
    let unmatched = state.snapshot.as_ref().map(|snap| {
        let rules = membership::Rules {
            node_id_annotation: &policy.spec.identity.node_id_annotation,
            topology_key: None,
            heartbeat_timeout: settings.heartbeat_timeout,
            fallback_now_ms: state.confirmed_ms,
        };
        no_presence(&membership::decide(selected, snap, &rules, &|_| None))
    });
    let prompt = unmatched.is_some_and(|u| state.awaiting_presence(&u, std::time::Instant::now()));
    let due = match since {
        None => true,
        Some(s) => s + Duration::from_millis(50) >= settings.poll_interval || (prompt && s >= PROMPT_FETCH_INTERVAL),
    };
    if due {
        state.last_attempt = Some(tokio::time::Instant::now());
        let started = std::time::Instant::now();
        let result = fetch(ctx, policy, settings, state.etag.as_deref()).await;
        ctx.metrics.presence_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Fetched::New { snapshot, etag, bytes }) => {
                ctx.metrics.presence_bytes.inc_by(bytes as u64);
                ctx.metrics.presence_fetches.get_or_create(&telemetry::ResultLabel { result: "ok".into() }).inc();
                state.snapshot = Some(snapshot);
                state.confirmed_ms = now_ms();
                state.etag = etag;
                state.failure = None;
            }
            Ok(Fetched::NotModified) => {
                ctx.metrics
                    .presence_fetches
                    .get_or_create(&telemetry::ResultLabel { result: "not_modified".into() })
                    .inc();
                // Unchanged body, later time: the heartbeats age by the time that passed.
                let now = now_ms();
                if let Some(snap) = state.snapshot.as_mut() {
                    snap.now_ms = snap.now_ms.map(|t| t + (now - state.confirmed_ms));
                }
                state.confirmed_ms = now;
                state.failure = None;
            }
            Err(e) => {
                ctx.metrics.presence_fetches.get_or_create(&telemetry::ResultLabel { result: "error".into() }).inc();
                ctx.metrics.presence_errors.get_or_create(&telemetry::KindLabel { kind: e.reason().into() }).inc();
                info!(policy = policy.name_any(), reason = e.reason(), error = %e, "presence unavailable; keeping the last snapshot");
                state.failure = Some((e.reason().to_owned(), e.to_string()));
            }
        }
    }
    Read { snapshot: state.snapshot.clone(), confirmed_ms: state.confirmed_ms, failure: state.failure.clone() }
}

/// The presence state of the policy with UID `uid`, created on first use.
fn presence_state(ctx: &Context, uid: &str) -> Arc<tokio::sync::Mutex<PresenceState>> {
    ctx.presence.lock().expect("presence map lock").entry(uid.to_owned()).or_default().clone()
}

/// Ready Pods (with an IP) that no presence entry matches.
fn no_presence(m: &Membership) -> HashSet<String> {
    m.excluded.iter().filter(|(_, e)| **e == Exclusion::NoPresence).map(|(pod, _)| pod.clone()).collect()
}

/// What a reconcile learns of presence.
struct Read {
    /// The snapshot to plan from: the last good one.
    snapshot: Option<Snapshot>,
    /// Local wall clock (ms) when it was last confirmed.
    confirmed_ms: f64,
    /// Why the rendezvous could not be read, while it cannot.
    failure: Option<(String, String)>,
}

async fn fetch(
    ctx: &Context,
    policy: &MeshPolicy,
    settings: &Settings,
    etag: Option<&str>,
) -> Result<Fetched, FetchError> {
    let token = match &policy.spec.rendezvous.join_token_secret_ref {
        None => None,
        Some(r) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
            let secret = secrets.get(&r.name).await.map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => FetchError::Token(format!("Secret {:?} not found", r.name)),
                other => FetchError::Token(format!("reading Secret {:?}: {other}", r.name)),
            })?;
            let bytes = secret
                .data
                .and_then(|mut d| d.remove(&r.key))
                .ok_or_else(|| FetchError::Token(format!("Secret {:?} has no key {:?}", r.name, r.key)))?;
            Some(
                String::from_utf8(bytes.0)
                    .map_err(|_| FetchError::Token(format!("Secret {:?} key {:?} is not UTF-8", r.name, r.key)))?
                    .trim()
                    .to_owned(),
            )
        }
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

fn uids(pods: &[Arc<Pod>], ns: &str) -> HashMap<String, String> {
    pods.iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter_map(|p| Some((p.name_any(), p.uid()?)))
        .collect()
}

/// Finalizer cleanup: remove this policy's annotations from every Pod that carries them.
async fn cleanup(policy: &MeshPolicy, ctx: &Context) -> Result<Action, Error> {
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let now: BTreeMap<String, Option<Assignment>> = ctx
        .pods
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| p.annotations().get(POLICY_ANNOTATION) == Some(&name))
        .map(|p| (p.name_any(), apply::current(p)))
        .collect();
    let want = now.keys().map(|k| (k.clone(), None)).collect();
    let changes = apply::diff(&now, &want, &uids(&ctx.pods.state(), &ns));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let n = apply::apply(&pods, &changes, ctx.apply_concurrency).await?;
    ctx.metrics.pod_patches.inc_by(n as u64);
    ctx.presence.lock().expect("presence map lock").remove(&policy.uid().unwrap_or_default());
    info!(policy = name, pods = n, "policy deleted; assignments removed");
    Ok(Action::await_change())
}
