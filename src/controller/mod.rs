//! The controller behind `mesh-operator run`: watches MeshPolicies, the agent Pods they select and Nodes
//! (metadata only) ([`watches`]), and reconciles each policy in steps ([`reconcile`] is the driver). Only
//! the Lease holder writes ([`leader`]).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt, core::PartialObjectMeta};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::api::MeshPolicy;
use crate::presence::Fetcher;
use crate::telemetry::{Health, Metrics};

// The steps of a reconcile, in data-flow order (see `reconcile`, the driver).
pub mod admission;
pub mod apply;
pub mod decide;
pub mod fleet;
pub mod health;
pub mod membership;
pub mod observe;
pub mod plan;
pub mod policy;
pub mod presence;
pub mod reconcile;
pub mod references;
pub mod report;
pub mod status;
pub mod store;
// What the steps share: the Pod cache and its changes, the Lease, the errors.
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod pods;
pub mod watches;

pub use error::Error;
use leader::Leadership;
use presence::PresenceState;

pub const FIELD_MANAGER: &str = "mesh-operator";
pub const FINALIZER: &str = "agentmesh.dev/cleanup";

/// The read timeout of every API request (set where the client is built): none may hang forever.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Watches end server-side well before [`READ_TIMEOUT`], so a quiet watch closes cleanly and resumes from
/// its resourceVersion, instead of failing as a timed-out read every minute.
fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(READ_TIMEOUT.as_secs() as u32 * 3 / 4)
}

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Who publishes the Events (for a recorder of PlanChanged's own, see [`report`]).
    pub reporter: Reporter,
    /// The Pod cache, with which Pods changed (see [`store`]).
    pub pods: store::PodStore,
    pub nodes: Store<PartialObjectMeta<Node>>,
    pub policies: Store<MeshPolicy>,
    pub fetcher: Arc<Fetcher>,
    /// The join-token Secrets the policies name, watched.
    pub references: references::References,
    /// What the controller keeps about each policy between reconciles, by UID.
    pub policy_states: std::sync::Mutex<HashMap<String, Arc<PolicyState>>>,
    pub leadership: Arc<Leadership>,
    pub expectations: apply::Expectations,
    /// Per namespace: held from a reconcile's decision to its last write.
    pub namespace_locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Set once this controller's Pod and policy caches, and the shared Node cache, hold a full list.
    pub caches_synced: AtomicBool,
    /// What the Pod cache was last listed for (see [`pods::Interest`]).
    pub cache_interest: std::sync::RwLock<Option<Arc<pods::Interest>>>,
    /// Whether the Pod cache sees events now (see [`admission::Admission::cache_blind_until`]).
    pub pod_sight: pods::Sight,
    pub nodes_synced: Arc<AtomicBool>,
    pub apply_concurrency: usize,
    pub pod_selector: Option<String>,
    /// Whether every reconcile checks the policy's kept view against one built from scratch.
    pub check_incremental: bool,
    /// PlanChanged Events come at most this often per policy.
    pub plan_event_interval: std::time::Duration,
    /// Runs a policy's reconcile from outside the watches (a long poll's answer).
    pub wakeups: futures::channel::mpsc::UnboundedSender<ObjectRef<MeshPolicy>>,
}

impl Context {
    pub fn synced(&self) -> bool {
        self.caches_synced.load(Ordering::SeqCst) && self.nodes_synced.load(Ordering::SeqCst)
    }

    /// Whether the Pod cache keeps the node-id annotation `key` on its Pods: a policy that reads a key the
    /// cache was not listed for would find no node ids, and so no agents. Since annotations are only ever
    /// added to what the cache keeps, a true answer stays true for every later state of the cache.
    pub fn cache_keeps(&self, key: &str) -> bool {
        self.cache_interest.read().expect("cache interest lock").as_ref().is_some_and(|i| i.keeps(key))
    }

    /// Whether the Pod cache keeps every label key `policies` read (see [`Context::cache_keeps`]): a
    /// selector read on a cache without its keys would select the wrong Pods.
    pub fn cache_keeps_labels(&self, policies: &[Arc<MeshPolicy>]) -> bool {
        let interest = self.cache_interest.read().expect("cache interest lock");
        let mut keys = policies.iter().flat_map(|p| pods::label_keys(p));
        interest.as_ref().is_some_and(|i| keys.all(|k| i.keeps_label(k)))
    }

    /// Runs the reconcile of policy `name` in `namespace` soon (or never, once the controller has ended).
    pub fn wake(&self, name: &str, namespace: &str) {
        let _ = self.wakeups.unbounded_send(ObjectRef::new(name).within(namespace));
    }

    /// What the controller keeps about the policy with UID `uid`, created on first use.
    pub fn policy_state(&self, uid: &str) -> Arc<PolicyState> {
        self.policy_states.lock().expect("policy state map lock").entry(uid.to_owned()).or_default().clone()
    }

    /// Drops what the controller keeps about policies no longer in the cache (deleted while this replica
    /// was a standby, or released by another replica): their views would otherwise stay forever.
    pub fn retain_policy_states(&self) {
        let mut states = self.policy_states.lock().expect("policy state map lock");
        let policies = self.policies.state();
        if states.len() > policies.len() {
            let live: std::collections::HashSet<String> = policies.iter().filter_map(|p| p.uid()).collect();
            states.retain(|uid, _| live.contains(uid));
        }
    }

    pub fn namespace_lock(&self, ns: &str) -> Arc<Mutex<()>> {
        self.namespace_locks.lock().expect("namespace lock map").entry(ns.to_owned()).or_default().clone()
    }

    /// Drops what the controller keeps about a deleted policy.
    pub fn forget(&self, policy: &MeshPolicy) {
        self.policy_states.lock().expect("policy state map lock").remove(&policy.uid().unwrap_or_default());
        let label = crate::telemetry::PolicyLabel::of(policy);
        self.metrics.forget_policy(&label);
        self.references.retain(&self.policies.state());
    }
}

/// The policies to reconcile again that no watch event names.
pub type Wakeups = futures::channel::mpsc::UnboundedReceiver<ObjectRef<MeshPolicy>>;

/// What the controller keeps about one policy between reconciles.
#[derive(Default)]
pub struct PolicyState {
    /// Presence polling, under its own lock: a slow rendezvous holds up only the policies that use it.
    pub presence: Mutex<PresenceState>,
    /// What the decide step keeps: newcomers held back during a burst of arrivals, the last plan.
    pub decide: std::sync::Mutex<decide::Memory>,
    /// The policy's view of its namespace, held by the reconcile that updates and reads it.
    pub fleet: Mutex<fleet::Fleet>,
    /// Plan changes not yet reported in an Event.
    pub events: std::sync::Mutex<report::PlanEvents>,
}

pub struct Settings {
    pub metrics_addr: SocketAddr,
    pub leader_elect: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub max_presence_bytes: usize,
    pub apply_concurrency: usize,
    /// Watch only these namespaces (Role-only RBAC); all namespaces when empty.
    pub namespaces: Vec<String>,
    /// A label selector the Pod watch sends to the API server: Pods it excludes are never read at all.
    pub pod_selector: Option<String>,
    /// Check every reconcile's kept view against one built from scratch (for tests: it costs a full pass).
    pub check_incremental: bool,
    /// PlanChanged Events come at most this often per policy.
    pub plan_event_interval: std::time::Duration,
}

/// How long the controllers get to finish their reconciles after SIGTERM/SIGINT before they are dropped:
/// a hung request must not keep the Lease held until it expires.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the controller until SIGTERM/SIGINT; releases the Lease on the way out. With namespaces given,
/// one controller per namespace (each with its own watches, as namespace-scoped RBAC requires) shares the
/// client, metrics, Node cache, presence client and Lease; without, one controller watches all.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>, health: Arc<Health>) -> anyhow::Result<()> {
    let leadership = Arc::new(Leadership::new(settings.leader_elect));
    metrics.leader.set(i64::from(!settings.leader_elect));
    // Every helper task lives in this set, so they all end with `run`, however it ends.
    let mut tasks = tokio::task::JoinSet::new();
    let (served_metrics, served_health, addr) = (metrics.clone(), health.clone(), settings.metrics_addr);
    tasks.spawn(async move {
        if let Err(e) = crate::telemetry::serve(addr, served_metrics, served_health).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    let (nodes, nodes_synced) = watches::nodes(&client, metrics.clone(), &mut tasks);
    let lease_task = match settings.leader_elect {
        true => Some(leader::elect(client.clone(), &settings, leadership.clone(), metrics.clone()).await?),
        false => None,
    };
    let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(settings.identity.clone()) };
    let shared = Shared {
        client: client.clone(),
        metrics,
        recorder: Recorder::new(client.clone(), reporter.clone()),
        reporter,
        nodes,
        nodes_synced,
        fetcher: Arc::new(Fetcher::new(settings.max_presence_bytes)),
        leadership,
        apply_concurrency: settings.apply_concurrency,
        pod_selector: settings.pod_selector.clone(),
        check_incremental: settings.check_incremental,
        plan_event_interval: settings.plan_event_interval,
    };
    let scopes = scopes(&settings.namespaces);
    if let Some(selector) = &settings.pod_selector {
        check_pod_selector(&client, &scopes[0], selector).await?;
    }
    let (mut contexts, mut controllers) = (Vec::new(), Vec::new());
    for scope in scopes {
        let (policies, policy_writer) = reflector::store();
        let (ctx, woken) = shared.context(policies);
        controllers.push(watches::controller(ctx.clone(), scope, policy_writer, woken));
        contexts.push(ctx);
    }
    let synced = contexts.clone();
    tasks.spawn(ready_once_synced(contexts, health));
    let any_synced = move || synced.iter().any(|c| c.synced());
    until_shutdown(futures::future::join_all(controllers), lease_task, &shared.leadership, any_synced).await;
    info!("shut down");
    Ok(())
}

/// Readiness turns true once every controller's watches have synced.
async fn ready_once_synced(contexts: Vec<Arc<Context>>, health: Arc<Health>) {
    while !contexts.iter().all(|c| c.synced()) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    health.synced.store(true, Ordering::Relaxed);
    info!(namespaces = contexts.len(), "watches synced; ready");
}

/// Runs `controllers` until they end or a signal comes; then gives them [`SHUTDOWN_GRACE`] and releases
/// the Lease, unless writes may still be in flight. None can be before any cache has synced, since no
/// reconcile starts before (and a controller stopped before its policy cache listed never ends by itself:
/// kube-runtime holds its runner until that cache is ready).
async fn until_shutdown(
    controllers: impl std::future::Future,
    mut lease_task: Option<leader::LeaseTask>,
    leadership: &Leadership,
    any_synced: impl Fn() -> bool,
) {
    let forced = tokio::select! {
        _ = controllers => false,
        () = async {
            shutdown_signal().await;
            if let Some(task) = lease_task.as_mut() {
                task.withdraw_unless_leading(leadership);
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await
        } => true,
    };
    match (lease_task, forced && any_synced()) {
        // Writes may still be in flight: the Lease runs out instead, so no standby leads before they land.
        (Some(_), true) => {
            warn!(grace = ?SHUTDOWN_GRACE, "reconciles outlived the shutdown grace; not releasing the Lease")
        }
        (Some(task), false) => leader::release(task).await,
        (None, _) => {}
    }
}

/// Refuses to start on a `--pod-selector` the API server cannot parse, rather than fail every watch.
async fn check_pod_selector(client: &Client, scope: &Option<String>, selector: &str) -> anyhow::Result<()> {
    let api: Api<Pod> = match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list_metadata(&kube::api::ListParams::default().labels(selector).limit(1)).await {
        Err(kube::Error::Api(s)) if s.code == 400 => {
            anyhow::bail!("--pod-selector {selector:?}: the API server refused it: {}", s.message)
        }
        _ => Ok(()),
    }
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The controllers to run: one per namespace, each once (a namespace named twice must not get two writers),
/// or one over all namespaces.
fn scopes(namespaces: &[String]) -> Vec<Option<String>> {
    let mut unique: Vec<Option<String>> = namespaces.iter().cloned().map(Some).collect();
    unique.sort();
    unique.dedup();
    if unique.is_empty() { vec![None] } else { unique }
}

/// What every namespace's controller shares.
struct Shared {
    client: Client,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    reporter: Reporter,
    nodes: Store<PartialObjectMeta<Node>>,
    nodes_synced: Arc<AtomicBool>,
    fetcher: Arc<Fetcher>,
    leadership: Arc<Leadership>,
    apply_concurrency: usize,
    pod_selector: Option<String>,
    check_incremental: bool,
    plan_event_interval: std::time::Duration,
}

impl Shared {
    /// The context of one controller, over its own Pod and policy caches, and the wakeups it sends.
    fn context(&self, policies: Store<MeshPolicy>) -> (Arc<Context>, Wakeups) {
        let (wakeups, woken) = futures::channel::mpsc::unbounded();
        let ctx = Arc::new(Context {
            client: self.client.clone(),
            metrics: self.metrics.clone(),
            recorder: self.recorder.clone(),
            reporter: self.reporter.clone(),
            pods: Default::default(),
            nodes: self.nodes.clone(),
            policies,
            fetcher: self.fetcher.clone(),
            references: references::References::new(self.client.clone(), self.metrics.clone()),
            policy_states: Default::default(),
            leadership: self.leadership.clone(),
            expectations: Default::default(),
            namespace_locks: Default::default(),
            caches_synced: AtomicBool::new(false),
            cache_interest: Default::default(),
            pod_sight: Default::default(),
            nodes_synced: self.nodes_synced.clone(),
            apply_concurrency: self.apply_concurrency,
            pod_selector: self.pod_selector.clone(),
            check_incremental: self.check_incremental,
            plan_event_interval: self.plan_event_interval,
            wakeups,
        });
        (ctx, woken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_end_before_the_read_timeout() {
        let server_side = watch_config().timeout.expect("a watch timeout");
        assert!(u64::from(server_side) + 10 <= READ_TIMEOUT.as_secs(), "{server_side} s against {READ_TIMEOUT:?}");
    }

    #[test]
    fn one_controller_per_namespace_or_one_for_all() {
        let ns = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(scopes(&[]), vec![None]);
        assert_eq!(scopes(&ns(&["b", "a", "b"])), vec![Some("a".to_string()), Some("b".to_string())]);
    }
}
