//! The controller behind `mesh-operator run`: watches MeshPolicies, the agent Pods they select and Nodes
//! (metadata only), and reconciles each policy in phases (see [`reconcile`]). Only the Lease holder writes.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, ResourceExt, core::PartialObjectMeta};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::api::{MeshPolicy, POLICY_ANNOTATION};
use crate::presence::Fetcher;
use crate::telemetry::{Health, Metrics};

pub mod apply;
pub mod leader;
pub mod membership;
pub mod reconcile;
pub mod status;

pub const FIELD_MANAGER: &str = "mesh-operator";
pub const FINALIZER: &str = "agentmesh.dev/cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("patching {failed} of {total} Pods failed; first: {first}")]
    Apply { failed: usize, total: usize, first: String },
}

impl Error {
    /// A stable label for the reconcile error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(_) => "finalizer",
            Self::Apply { .. } => "apply",
        }
    }
}

/// What one reconcile knows of a policy's presence between polls.
#[derive(Default)]
pub struct PresenceState {
    /// The last good snapshot, with its clock advanced by local time on 304s.
    pub snapshot: Option<crate::presence::Snapshot>,
    /// Local wall clock (ms) when `snapshot` was last confirmed.
    pub confirmed_ms: f64,
    pub etag: Option<String>,
    pub last_attempt: Option<tokio::time::Instant>,
    /// The last failure's reason and message while the rendezvous is unreachable.
    pub failure: Option<(String, String)>,
    /// Ready Pods without a presence entry, and when each was first seen so.
    pub waiting: HashMap<String, std::time::Instant>,
}

impl PresenceState {
    /// How long a Ready Pod without presence is worth prompt re-reads; after that it is an agent that did
    /// not register, and the normal poll interval serves it.
    pub const PROMPT_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

    /// Records which Ready Pods lack presence now; whether any began waiting within [`Self::PROMPT_WINDOW`].
    pub fn awaiting_presence(
        &mut self,
        unmatched: &std::collections::HashSet<String>,
        now: std::time::Instant,
    ) -> bool {
        self.waiting.retain(|pod, _| unmatched.contains(pod));
        for pod in unmatched {
            self.waiting.entry(pod.clone()).or_insert(now);
        }
        self.waiting.values().any(|&since| now.saturating_duration_since(since) < Self::PROMPT_WINDOW)
    }
}

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub pods: Store<Pod>,
    pub nodes: Store<PartialObjectMeta<Node>>,
    pub policies: Store<MeshPolicy>,
    pub fetcher: Arc<Fetcher>,
    /// Per policy UID: its own lock, so a slow rendezvous holds up only the policies that use it.
    pub presence: std::sync::Mutex<HashMap<String, Arc<Mutex<PresenceState>>>>,
    pub leader: Arc<AtomicBool>,
    pub apply_concurrency: usize,
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
}

/// Drops what the controller never reads from a cached Pod, so a large fleet costs little memory.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    pod.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
    if let Some(spec) = pod.spec.as_mut() {
        *spec = k8s_openapi::api::core::v1::PodSpec { node_name: spec.node_name.take(), ..Default::default() };
    }
    if let Some(status) = pod.status.as_mut() {
        let ready = status.conditions.take().map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect());
        *status = k8s_openapi::api::core::v1::PodStatus {
            conditions: ready,
            pod_ip: status.pod_ip.take(),
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

/// Policies a Pod event concerns: those whose selector matches it, and the one named on it (so a Pod that
/// stopped matching is cleaned up).
fn policies_for_pod(pod: &Pod, policies: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    let ns = pod.namespace().unwrap_or_default();
    let named = pod.annotations().get(POLICY_ANNOTATION);
    policies
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| named == Some(&p.name_any()) || reconcile::selects(p, pod))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Runs the controller until SIGTERM/SIGINT; releases the Lease on the way out. With namespaces given,
/// one controller per namespace (each with its own watches, as namespace-scoped RBAC requires) shares the
/// client, metrics, Node cache, presence client and Lease; without, one controller watches all.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>, health: Arc<Health>) -> anyhow::Result<()> {
    let (metrics_for_server, health_for_server) = (metrics.clone(), health.clone());
    let leader = Arc::new(AtomicBool::new(!settings.leader_elect));
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
    let node_stream = watcher(node_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(node_writer)
        .for_each(|_| async {});
    tasks.spawn(node_stream);

    let (lease_rx, lease_task) = if settings.leader_elect {
        let (rx, task) = leader::elect(client.clone(), &settings, leader.clone(), metrics.clone()).await?;
        (Some(rx), Some(task))
    } else {
        (None, None)
    };

    let shared = Shared {
        client: client.clone(),
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: FIELD_MANAGER.into(), instance: Some(settings.identity.clone()) },
        ),
        nodes: nodes.clone(),
        fetcher: Arc::new(Fetcher::new(settings.max_presence_bytes)),
        leader: leader.clone(),
        apply_concurrency: settings.apply_concurrency,
    };
    let scopes = scopes(&settings.namespaces);
    let (synced_tx, mut synced_rx) = tokio::sync::mpsc::channel(scopes.len());
    let controllers: Vec<_> =
        scopes.iter().map(|scope| controller(&shared, scope.clone(), lease_rx.clone(), synced_tx.clone())).collect();
    // The Lease is released once every receiver is gone: the controllers hold the only ones left.
    drop((synced_tx, lease_rx));
    let ready = {
        let (nodes, health, scopes) = (nodes.clone(), health.clone(), scopes.len());
        async move {
            for _ in 0..scopes {
                synced_rx.recv().await;
            }
            let _ = nodes.wait_until_ready().await;
            health.synced.store(true, Ordering::Relaxed);
            info!(namespaces = scopes, "watches synced; ready");
        }
    };
    tasks.spawn(ready);
    futures::future::join_all(controllers).await;

    info!("shutting down");
    if let Some(task) = lease_task {
        leader::release(task).await;
    }
    Ok(())
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
    fetcher: Arc<Fetcher>,
    leader: Arc<AtomicBool>,
    apply_concurrency: usize,
}

/// One controller over the MeshPolicies and Pods of `scope` (a namespace, or all). It reports on `synced`
/// once its Pod and policy caches hold a full list, and ends on SIGTERM/SIGINT.
async fn controller(
    shared: &Shared,
    scope: Option<String>,
    lease_rx: Option<tokio::sync::watch::Receiver<bool>>,
    synced: tokio::sync::mpsc::Sender<()>,
) {
    let client = shared.client.clone();
    let (policy_api, pod_api): (Api<MeshPolicy>, Api<Pod>) = match &scope {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (pods, pod_writer) = reflector::store();
    let pod_stream = watcher(pod_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(trim_pod)
        .reflect(pod_writer)
        .touched_objects();

    // The policy cache reports its initial sync through a channel of its own: the controller already waits
    // on this store's readiness, and kube-runtime's readiness future wakes only one waiter, so a second
    // `wait_until_ready` here could sleep forever.
    let (policies, policy_writer) = reflector::store();
    let (policies_synced_tx, mut policies_synced) = tokio::sync::watch::channel(false);
    let policy_stream = watcher(policy_api, watcher::Config::default())
        .default_backoff()
        .reflect(policy_writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                let _ = policies_synced_tx.send(true);
            }
        })
        .applied_objects();
    // No debounce: under a steady stream of Pod events a debounce postpones the reconcile until the stream
    // stops. Batching comes from the scheduler instead: events that arrive while a policy reconciles merge
    // into one pending run, so each run takes in everything that changed during the previous one.
    let controller = Controller::for_stream(policy_stream, policies.clone())
        .with_config(controller::Config::default().concurrency(8));
    let ctx = Arc::new(Context {
        client,
        metrics: shared.metrics.clone(),
        recorder: shared.recorder.clone(),
        pods: pods.clone(),
        nodes: shared.nodes.clone(),
        policies: policies.clone(),
        fetcher: shared.fetcher.clone(),
        presence: Default::default(),
        leader: shared.leader.clone(),
        apply_concurrency: shared.apply_concurrency,
    });

    // Becoming leader re-runs every policy at once, so a standby takes over without waiting for a resync.
    let became_leader = futures::stream::unfold(lease_rx, |rx| async move {
        let mut rx = rx?;
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow() {
                return Some(((), Some(rx)));
            }
        }
    });
    let ready = async move {
        let _ = pods.wait_until_ready().await;
        let _ = policies_synced.wait_for(|synced| *synced).await;
        tracing::debug!(namespace = ?scope, "pod and policy caches synced");
        let _ = synced.send(()).await;
    };
    let mapper_store = policies.clone();
    let run = controller
        .watches_stream(pod_stream, move |pod| policies_for_pod(&pod, &mapper_store))
        .reconcile_all_on(became_leader)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
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
    fn prompt_reads_only_for_pods_that_began_waiting_recently() {
        let set = |pods: &[&str]| pods.iter().map(|p| p.to_string()).collect::<std::collections::HashSet<_>>();
        let t0 = std::time::Instant::now();
        let mut state = PresenceState::default();
        assert!(!state.awaiting_presence(&set(&[]), t0));
        assert!(state.awaiting_presence(&set(&["a"]), t0));
        let later = t0 + PresenceState::PROMPT_WINDOW;
        assert!(!state.awaiting_presence(&set(&["a"]), later), "a never registered: the poll interval serves it");
        assert!(state.awaiting_presence(&set(&["a", "b"]), later), "b just turned Ready");
        assert!(!state.awaiting_presence(&set(&["a"]), later), "b found its entry");
        assert!(state.awaiting_presence(&set(&["b"]), later), "b waits again: a fresh window");
        assert_eq!(state.waiting.len(), 1);
    }

    #[test]
    fn one_controller_per_namespace_or_one_for_all() {
        let ns = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(scopes(&[]), vec![None]);
        assert_eq!(scopes(&ns(&["b", "a", "b"])), vec![Some("a".to_string()), Some("b".to_string())]);
    }
}
