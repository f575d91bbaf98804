//! The watches that feed the reconciles: Nodes (metadata only, shared by every namespace's controller),
//! and per controller its MeshPolicies and Pods, wired into one kube-runtime `Controller`.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, ResourceExt, core::PartialObjectMeta};
use tracing::warn;

use super::pods::{self, CachedPod, Interest};
use super::{Context, reconcile, watch_config};
use crate::api::MeshPolicy;
use crate::telemetry::Metrics;

/// The Node cache, and a flag set once it holds a full list. Its tasks go into `tasks`.
pub fn nodes(
    client: &Client,
    metrics: Arc<Metrics>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> (Store<PartialObjectMeta<Node>>, Arc<AtomicBool>) {
    let (nodes, writer) = reflector::store();
    let api: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
    let stream = watcher(api, watch_config().any_semantic()).default_backoff().reflect(writer).for_each(move |event| {
        if let Err(e) = event {
            metrics.watch_failed("nodes", &e);
        }
        std::future::ready(())
    });
    tasks.spawn(stream);
    let synced = Arc::new(AtomicBool::new(false));
    let (store, flag) = (nodes.clone(), synced.clone());
    tasks.spawn(async move {
        let _ = store.wait_until_ready().await;
        flag.store(true, Ordering::SeqCst);
    });
    (nodes, synced)
}

/// One controller over the MeshPolicies and Pods of `scope` (a namespace, or all). It sets
/// `caches_synced` once its Pod and policy caches hold a full list, and ends on SIGTERM/SIGINT. `woken` runs
/// policies again that no event names.
pub async fn controller(
    ctx: Arc<Context>,
    scope: Option<String>,
    policy_writer: reflector::store::Writer<MeshPolicy>,
    woken: super::Wakeups,
) {
    let client = ctx.client.clone();
    let (policy_api, pod_api): (Api<MeshPolicy>, Api<Pod>) = match &scope {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (interest_tx, interest) = tokio::sync::watch::channel(None);
    let (policies_synced_tx, mut policies_synced) = tokio::sync::watch::channel(false);
    let pod_stream = pod_events(&ctx, pod_api, interest);
    let policy_stream = policy_events(&ctx, policy_api, policy_writer, interest_tx, policies_synced_tx);
    // No debounce: under a steady stream of Pod events a debounce postpones the reconcile until the stream
    // stops. Batching comes from the scheduler instead: events that arrive while a policy reconciles merge
    // into one pending run, so each run takes in everything that changed during the previous one.
    let controller = Controller::for_stream(policy_stream, ctx.policies.clone())
        .with_config(controller::Config::default().concurrency(8));
    let ready_ctx = ctx.clone();
    let ready = async move {
        ready_ctx.pods.listed().await;
        let _ = policies_synced.wait_for(|synced| *synced).await;
        tracing::debug!(namespace = ?scope, "pod and policy caches synced");
        ready_ctx.caches_synced.store(true, Ordering::SeqCst);
    };
    let run = controller
        .reconcile_on(pod_stream)
        .reconcile_all_on(leadership_gained(&ctx))
        .reconcile_on(woken)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            match res {
                // Already counted and logged where the watch failed, or by `error_policy`.
                Err(controller::Error::QueueError(_) | controller::Error::ReconcilerFailed(..)) | Ok(_) => {}
                Err(e) => warn!(error = %e, "the controller failed"),
            }
        });
    // The readiness probe is not part of the controller's life: it ends when the controller does.
    tokio::select! {
        () = run => {}
        () = async { ready.await; std::future::pending::<()>().await } => {}
    }
}

/// The Pods into the cache (see [`pods::watch`]), and out as the policies each event concerns; the cache's
/// interest becomes the one its list was made with once the store has swapped that list in.
fn pod_events(
    ctx: &Arc<Context>,
    api: Api<Pod>,
    interest: tokio::sync::watch::Receiver<Option<Interest>>,
) -> impl Stream<Item = ObjectRef<MeshPolicy>> + Send + use<> {
    let mut config = watch_config();
    if let Some(selector) = &ctx.pod_selector {
        config = config.labels(selector);
    }
    let listing: Arc<std::sync::Mutex<Option<Arc<Interest>>>> = Default::default();
    let (listing_in, listed_ctx, metrics) = (listing.clone(), ctx.clone(), ctx.metrics.clone());
    let (recording, policies) = (ctx.clone(), ctx.policies.clone());
    pods::watch(api, config, interest)
        .inspect_err(move |e| metrics.watch_failed("pods", e))
        .map_ok(move |(event, interest)| {
            *listing_in.lock().expect("listing lock") = Some(interest);
            event
        })
        .inspect_ok(move |event| recording.pods.apply(event))
        .inspect_ok(move |event| match event {
            watcher::Event::Init => listed_ctx.pod_sight.listing(),
            watcher::Event::InitDone => {
                tracing::debug!("the Pod cache holds a complete list");
                listed_ctx.pod_sight.listed(std::time::Instant::now());
                let done = listing.lock().expect("listing lock").clone();
                *listed_ctx.cache_interest.write().expect("cache interest lock") = done;
            }
            _ => {}
        })
        .filter_map(|event| std::future::ready(event.ok()))
        .flat_map(move |event| {
            let pod = match event {
                watcher::Event::Apply(pod) | watcher::Event::Delete(pod) | watcher::Event::InitApply(pod) => Some(pod),
                watcher::Event::Init | watcher::Event::InitDone => None,
            };
            futures::stream::iter(pod.map(|pod| policies_for_pod(&pod, &policies)).unwrap_or_default())
        })
}

/// The MeshPolicies into their cache. Once they are listed, every change sends the Pod watch the interest
/// they make (only ever widened). The initial sync is reported through a channel of its own: the
/// controller already waits on this store's readiness, and kube-runtime's readiness future wakes only one
/// waiter, so a second `wait_until_ready` could sleep forever.
fn policy_events(
    ctx: &Arc<Context>,
    api: Api<MeshPolicy>,
    writer: reflector::store::Writer<MeshPolicy>,
    interest_tx: tokio::sync::watch::Sender<Option<Interest>>,
    synced_tx: tokio::sync::watch::Sender<bool>,
) -> impl Stream<Item = Result<MeshPolicy, watcher::Error>> + Send + use<> {
    let (store, metrics) = (ctx.policies.clone(), ctx.metrics.clone());
    watcher(api, watch_config())
        .default_backoff()
        .inspect_err(move |e| metrics.watch_failed("meshpolicies", e))
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                let _ = synced_tx.send(true);
            }
            // The Pod watch starts only once the policies are listed, or it would list for nobody.
            if *synced_tx.borrow() {
                interest_tx.send_if_modified(|was| {
                    let now = Some(Interest::of(&store.state()).widen(was.as_ref()));
                    std::mem::replace(was, now.clone()) != now
                });
            }
        })
        .applied_objects()
}

/// Fires on each new leadership term: becoming leader re-runs every policy at once (the fence is already
/// up when it fires).
fn leadership_gained(ctx: &Context) -> impl Stream<Item = ()> + Send + use<> {
    futures::stream::unfold(ctx.leadership.subscribe(), |mut rx| async move {
        let mut seen = rx.borrow_and_update().number;
        loop {
            rx.changed().await.ok()?;
            let term = rx.borrow_and_update().number;
            if term != seen {
                return Some(((), rx));
            }
            seen = term;
        }
    })
}

/// Policies a Pod event concerns: those whose selector matches it, and the one named on it (so a Pod that
/// stopped matching is cleaned up).
fn policies_for_pod(pod: &CachedPod, policies: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    let ns = &*pod.namespace;
    let named = pod.keys.policy();
    policies
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter(|p| named == Some(p.name_any().as_str()) || p.selects_labels(Some(ns), pod.labels()))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A Pod event reaches the policies that select the Pod as the cache keeps it (its labels apart from
    /// `metadata`), and the policy it names.
    #[test]
    fn a_cached_pod_event_reaches_the_policies_that_select_it() {
        let policy = |name: &str, app: &str| -> MeshPolicy {
            serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
                "metadata": {"name": name, "namespace": "ci"},
                "spec": {"selector": {"matchLabels": {"app": app}}, "rendezvous": {"url": "http://rv"}}}))
            .unwrap()
        };
        let (store, mut writer) = reflector::store::<MeshPolicy>();
        for p in [policy("agents", "agent"), policy("web", "web"), policy("named", "none")] {
            writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let interest = Interest::of(&store.state());
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "a", "namespace": "ci",
            "labels": {"app": "agent"}, "annotations": {"agentmesh.dev/policy": "named"}}}))
        .unwrap();
        let cached = CachedPod::new(pod, &|k| interest.keeps(k), &|k| interest.keeps_label(k), &mut Default::default());
        let mut reached: Vec<String> = policies_for_pod(&cached, &store).into_iter().map(|r| r.name).collect();
        reached.sort();
        assert_eq!(reached, ["agents", "named"]);
    }
}
