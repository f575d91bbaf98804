//! The controller behind `mesh-operator run`: watches MeshPolicies, the agent Pods they select and Nodes
//! (metadata only), and reconciles each policy in phases (see [`reconcile`]). Only the Lease holder writes.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
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
pub mod membership;
pub mod observe;
pub mod plan;
pub mod policy;
pub mod presence;
pub mod reconcile;
pub mod report;
pub mod status;
pub mod token;
// What the steps share: the Pod cache, the Lease, the errors.
pub mod error;
pub mod leader;
pub mod pods;

pub use error::Error;
use leader::Leadership;
use pods::CachedPod;
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
    pub pods: Store<CachedPod>,
    pub nodes: Store<PartialObjectMeta<Node>>,
    pub policies: Store<MeshPolicy>,
    pub fetcher: Arc<Fetcher>,
    /// The join-token Secrets the policies name, watched.
    pub tokens: token::Tokens,
    /// Per policy UID: its own lock, so a slow rendezvous holds up only the policies that use it.
    pub presence: std::sync::Mutex<HashMap<String, Arc<Mutex<PresenceState>>>>,
    pub leadership: Arc<Leadership>,
    pub expectations: apply::Expectations,
    /// Per policy UID: its newcomers held back during a burst.
    pub admissions: std::sync::Mutex<HashMap<String, admission::Admission>>,
    /// Per namespace: held from a reconcile's decision to its last write.
    pub namespace_locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Set once this controller's Pod and policy caches, and the shared Node cache, hold a full list.
    pub caches_synced: AtomicBool,
    /// What the Pod cache was last listed for (see [`pods::Interest`]).
    pub cache_interest: std::sync::RwLock<Option<Arc<pods::Interest>>>,
    pub nodes_synced: Arc<AtomicBool>,
    pub apply_concurrency: usize,
    pub pod_selector: Option<String>,
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

    /// The presence state of the policy with UID `uid`, created on first use.
    pub fn presence_state(&self, uid: &str) -> Arc<Mutex<PresenceState>> {
        self.presence.lock().expect("presence map lock").entry(uid.to_owned()).or_default().clone()
    }

    pub fn namespace_lock(&self, ns: &str) -> Arc<Mutex<()>> {
        self.namespace_locks.lock().expect("namespace lock map").entry(ns.to_owned()).or_default().clone()
    }

    /// Drops what the controller keeps about a deleted policy.
    pub fn forget(&self, policy: &MeshPolicy) {
        self.presence.lock().expect("presence map lock").remove(&policy.uid().unwrap_or_default());
        self.admissions.lock().expect("admission map lock").remove(&policy.uid().unwrap_or_default());
        let label = crate::telemetry::PolicyLabel {
            namespace: policy.namespace().unwrap_or_default(),
            policy: policy.name_any(),
        };
        self.metrics.forget_policy(&label);
        if let Some(ca) = &policy.spec.rendezvous.ca_bundle {
            self.fetcher.forget(ca);
        }
    }
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
}

/// Policies a Pod event concerns: those whose selector matches it, and the one named on it (so a Pod that
/// stopped matching is cleaned up).
fn policies_for_pod(pod: &CachedPod, policies: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    let ns = pod.namespace().unwrap_or_default();
    let named = pod.keys.policy();
    policies
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| named == Some(p.name_any().as_str()) || p.selects(pod))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// How long the controllers get to finish their reconciles after SIGTERM/SIGINT before they are dropped:
/// a hung request must not keep the Lease held until it expires.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the controller until SIGTERM/SIGINT; releases the Lease on the way out. With namespaces given,
/// one controller per namespace (each with its own watches, as namespace-scoped RBAC requires) shares the
/// client, metrics, Node cache, presence client and Lease; without, one controller watches all.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>, health: Arc<Health>) -> anyhow::Result<()> {
    let (metrics_for_server, health_for_server) = (metrics.clone(), health.clone());
    let leadership = Arc::new(Leadership::new(settings.leader_elect));
    metrics.leader.set(i64::from(!settings.leader_elect));
    // Every helper task lives in this set, so they all end with `run`, however it ends.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        if let Err(e) = crate::telemetry::serve(settings.metrics_addr, metrics_for_server, health_for_server).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });

    let (nodes, node_writer) = reflector::store();
    let node_api: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
    let node_metrics = metrics.clone();
    let node_stream = watcher(node_api, watch_config().any_semantic()).default_backoff().reflect(node_writer).for_each(
        move |event| {
            if let Err(e) = event {
                node_metrics.watch_failed("nodes", &e);
            }
            std::future::ready(())
        },
    );
    tasks.spawn(node_stream);
    let nodes_synced = Arc::new(AtomicBool::new(false));
    let (store, flag) = (nodes.clone(), nodes_synced.clone());
    tasks.spawn(async move {
        let _ = store.wait_until_ready().await;
        flag.store(true, Ordering::SeqCst);
    });

    let lease_task = match settings.leader_elect {
        true => Some(leader::elect(client.clone(), &settings, leadership.clone(), metrics.clone()).await?),
        false => None,
    };
    let shared = Shared {
        client: client.clone(),
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: FIELD_MANAGER.into(), instance: Some(settings.identity.clone()) },
        ),
        nodes,
        nodes_synced,
        fetcher: Arc::new(Fetcher::new(settings.max_presence_bytes)),
        leadership,
        apply_concurrency: settings.apply_concurrency,
        pod_selector: settings.pod_selector.clone(),
    };
    let scopes = scopes(&settings.namespaces);
    if let Some(selector) = &settings.pod_selector {
        check_pod_selector(&client, &scopes[0], selector).await?;
    }
    let mut contexts = Vec::new();
    let mut controllers = Vec::new();
    for scope in scopes {
        let ((pods, pod_writer), (policies, policy_writer)) = (reflector::store(), reflector::store());
        let ctx = shared.context(pods, policies);
        controllers.push(controller(ctx.clone(), scope, pod_writer, policy_writer));
        contexts.push(ctx);
    }
    let ready = {
        let (contexts, health) = (contexts.clone(), health.clone());
        async move {
            while !contexts.iter().all(|c| c.synced()) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            health.synced.store(true, Ordering::Relaxed);
            info!(namespaces = contexts.len(), "watches synced; ready");
        }
    };
    tasks.spawn(ready);
    let mut lease_task = lease_task;
    let forced = tokio::select! {
        _ = futures::future::join_all(controllers) => false,
        () = async {
            shutdown_signal().await;
            if let Some(task) = lease_task.as_mut() {
                task.withdraw_unless_leading(&shared.leadership);
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await
        } => true,
    };
    match (lease_task, forced) {
        // Writes may still be in flight: the Lease runs out instead, so no standby leads before they land.
        (Some(_), true) => {
            warn!(grace = ?SHUTDOWN_GRACE, "reconciles outlived the shutdown grace; not releasing the Lease")
        }
        (Some(task), false) => leader::release(task).await,
        (None, _) => {}
    }
    info!("shut down");
    Ok(())
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
    nodes: Store<PartialObjectMeta<Node>>,
    nodes_synced: Arc<AtomicBool>,
    fetcher: Arc<Fetcher>,
    leadership: Arc<Leadership>,
    apply_concurrency: usize,
    pod_selector: Option<String>,
}

impl Shared {
    /// The context of one controller, over its own Pod and policy caches.
    fn context(&self, pods: Store<CachedPod>, policies: Store<MeshPolicy>) -> Arc<Context> {
        Arc::new(Context {
            client: self.client.clone(),
            metrics: self.metrics.clone(),
            recorder: self.recorder.clone(),
            pods,
            nodes: self.nodes.clone(),
            policies,
            fetcher: self.fetcher.clone(),
            tokens: token::Tokens::new(self.client.clone()),
            presence: Default::default(),
            leadership: self.leadership.clone(),
            expectations: Default::default(),
            admissions: Default::default(),
            namespace_locks: Default::default(),
            caches_synced: AtomicBool::new(false),
            cache_interest: Default::default(),
            nodes_synced: self.nodes_synced.clone(),
            apply_concurrency: self.apply_concurrency,
            pod_selector: self.pod_selector.clone(),
        })
    }
}

/// One controller over the MeshPolicies and Pods of `scope` (a namespace, or all). It sets
/// `caches_synced` once its Pod and policy caches hold a full list, and ends on SIGTERM/SIGINT.
async fn controller(
    ctx: Arc<Context>,
    scope: Option<String>,
    pod_writer: reflector::store::Writer<CachedPod>,
    policy_writer: reflector::store::Writer<MeshPolicy>,
) {
    let client = ctx.client.clone();
    let (policy_api, pod_api): (Api<MeshPolicy>, Api<Pod>) = match &scope {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (pods, policies) = (ctx.pods.clone(), ctx.policies.clone());
    let interest_store = policies.clone();
    // Lists from etcd, not the API server's cache: a relist must never show Pods older than our writes.
    let (pod_metrics, policy_metrics) = (ctx.metrics.clone(), ctx.metrics.clone());
    let (interest_tx, interest) = tokio::sync::watch::channel(None);
    let mut pod_config = watch_config();
    if let Some(selector) = &ctx.pod_selector {
        pod_config = pod_config.labels(selector);
    }
    // Which interest the list in progress was made with; it becomes the cache's once the reflector has
    // swapped that list in.
    let listing: Arc<std::sync::Mutex<Option<Arc<pods::Interest>>>> = Default::default();
    let (listing_in, listed_ctx) = (listing.clone(), ctx.clone());
    let pod_stream = pods::watch(pod_api, pod_config, interest)
        .inspect_err(move |e| pod_metrics.watch_failed("pods", e))
        .map_ok(move |(event, interest)| {
            *listing_in.lock().expect("listing lock") = Some(interest);
            event
        })
        .reflect(pod_writer)
        .inspect_ok(move |event| {
            if let watcher::Event::InitDone = event {
                let done = listing.lock().expect("listing lock").clone();
                *listed_ctx.cache_interest.write().expect("cache interest lock") = done;
            }
        })
        .touched_objects();

    // The policy cache reports its initial sync through a channel of its own: the controller already waits
    // on this store's readiness, and kube-runtime's readiness future wakes only one waiter, so a second
    // `wait_until_ready` here could sleep forever.
    let (policies_synced_tx, mut policies_synced) = tokio::sync::watch::channel(false);
    let policy_stream = watcher(policy_api, watch_config())
        .default_backoff()
        .inspect_err(move |e| policy_metrics.watch_failed("meshpolicies", e))
        .reflect(policy_writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                let _ = policies_synced_tx.send(true);
            }
            // The Pod watch starts only once the policies are listed, or it would list for nobody.
            if *policies_synced_tx.borrow() {
                interest_tx.send_if_modified(|was| {
                    let now = Some(pods::Interest::of(&interest_store.state()).widen(was.as_ref()));
                    std::mem::replace(was, now.clone()) != now
                });
            }
        })
        .applied_objects();
    // No debounce: under a steady stream of Pod events a debounce postpones the reconcile until the stream
    // stops. Batching comes from the scheduler instead: events that arrive while a policy reconciles merge
    // into one pending run, so each run takes in everything that changed during the previous one.
    let controller = Controller::for_stream(policy_stream, policies.clone())
        .with_config(controller::Config::default().concurrency(8));
    // Becoming leader (a new term) re-runs every policy at once; the fence is already up when it fires.
    let became_leader = futures::stream::unfold(ctx.leadership.subscribe(), |mut rx| async move {
        let mut seen = rx.borrow_and_update().number;
        loop {
            rx.changed().await.ok()?;
            let term = rx.borrow_and_update().number;
            if term != seen {
                return Some(((), rx));
            }
            seen = term;
        }
    });
    let ready_ctx = ctx.clone();
    let ready = async move {
        let _ = pods.wait_until_ready().await;
        let _ = policies_synced.wait_for(|synced| *synced).await;
        tracing::debug!(namespace = ?scope, "pod and policy caches synced");
        ready_ctx.caches_synced.store(true, Ordering::SeqCst);
    };
    let mapper_store = policies.clone();
    let run = controller
        .watches_stream(pod_stream, move |pod| policies_for_pod(&pod, &mapper_store))
        .reconcile_all_on(became_leader)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            match res {
                // Already counted and logged where the watch failed.
                Err(controller::Error::QueueError(_)) | Ok(_) => {}
                Err(e) => warn!(error = %e, "reconcile failed"),
            }
        });
    // The readiness probe is not part of the controller's life: it ends when the controller does.
    tokio::select! {
        () = run => {}
        () = async { ready.await; std::future::pending::<()>().await } => {}
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
