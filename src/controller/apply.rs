//! Apply: carries out the waves [`decide`](super::decide) chose. Assignments go by server-side apply under
//! one field manager; removals by a merge patch that deletes every assignment key (the node id stays),
//! whoever wrote it (an apply of `{}` would only drop the keys this manager owns). Each write names the Pod's UID, so it
//! reaches only the Pod the decision saw. Leadership is re-checked before each wave, and the writes are
//! remembered until the Pod cache shows them (see [`Expectations`]), so no decision is taken on a cache
//! older than our own writes.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;

use super::FIELD_MANAGER;
use super::decide::{Waves, Write};
use super::leader::Leadership;
use crate::assignment::{self, Assignment};
use crate::telemetry::ResultLabel;

/// Pod writes counted by result.
pub type Patches = Family<ResultLabel, Counter>;

/// How the API server words a refused resourceVersion or UID precondition.
const PRECONDITIONS: [&str; 3] = ["the object has been modified", "Precondition failed: UID", "uid mismatch"];

/// What the chart's leader fence (a ValidatingAdmissionPolicy) says when it refuses a write.
const FENCED: &str = "does not hold the leader Lease";

/// What applying the waves did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub patched: usize,
    /// Pods written successfully (in any wave).
    pub written: std::collections::BTreeSet<String>,
    /// Pods whose write failed, and why.
    pub failed: BTreeMap<String, WriteError>,
    /// Pods whose grow write was held back because a shrink write it depends on failed.
    pub held: Vec<String>,
    /// Leadership was lost before a wave: nothing more was written.
    pub lost_leadership: bool,
    /// The resourceVersion each of our writes left its Pod at: a grow write to a Pod its shrink write
    /// just changed is conditional on that version, not on the one the decision read.
    versions: HashMap<String, String>,
}

/// Applies `waves`: every shrink write, then the grow writes that stay safe given which shrink writes
/// failed. Each write starts only while `leadership` allows, and is abandoned when its fence ends.
pub async fn apply(
    api: &Api<Pod>,
    waves: &Waves,
    concurrency: usize,
    leadership: &Leadership,
    expectations: &Expectations,
    patched: &Patches,
) -> Outcome {
    let mut outcome = Outcome::default();
    let may_write = || leadership.may_write();
    if !may_write() {
        outcome.lost_leadership = !waves.is_empty();
        return outcome;
    }
    let term = leadership.term();
    let ctx = WaveContext { api, concurrency, leadership, expectations, patched };
    wave(&ctx, waves.shrink.iter().collect(), &mut outcome).await;
    let failed: HashSet<String> = outcome.failed.keys().cloned().collect();
    let (grow, held) = waves.grow_after(&failed);
    outcome.held = held.into_iter().map(str::to_owned).collect();
    if grow.is_empty() {
        return outcome;
    }
    // A shrink wave cut short, or a leadership lost and regained meanwhile (another leader may have
    // written since this decision): the grow wave waits for a fresh decision.
    if outcome.lost_leadership || !may_write() || leadership.term() != term {
        outcome.lost_leadership = true;
        return outcome;
    }
    wave(&ctx, grow, &mut outcome).await;
    outcome
}

struct WaveContext<'a> {
    api: &'a Api<Pod>,
    concurrency: usize,
    leadership: &'a Leadership,
    expectations: &'a Expectations,
    patched: &'a Patches,
}

/// Why a write did not happen, or may not have.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The fence had ended before it started: nothing was sent.
    #[error("not written: leadership ended")]
    NotStarted,
    /// No answer before its deadline (the fence's end, or [`super::leader::UNFENCED_WRITE`]).
    #[error("no answer before the write's deadline")]
    TimedOut,
    #[error(transparent)]
    Rejected(#[from] kube::Error),
}

impl WriteError {
    /// Refused by the API server's own preconditions because the Pod is no longer the one its decision
    /// read (a 409 on the resourceVersion or UID; a 422 on the immutable UID when it was replaced under the
    /// same name): not a failure to report, only a decision to take again. A 409 from anything else (an
    /// admission webhook) is a failure.
    pub fn is_stale(&self) -> bool {
        let precondition = |s: &kube::core::Status| PRECONDITIONS.iter().any(|p| s.message.contains(p));
        matches!(self, Self::Rejected(kube::Error::Api(s)) if (s.code == 409 && precondition(s)) || uid_mismatch(s))
    }

    /// Refused by the chart's leader fence: the API server's Lease names another replica.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::Rejected(kube::Error::Api(s)) if s.code == 403 && s.message.contains(FENCED))
    }

    /// The `result` label of `mesh_operator_pod_patches_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotStarted => "not_started",
            Self::TimedOut => "timed_out",
            _ if self.is_stale() => "stale",
            _ if self.is_fenced() => "fenced",
            Self::Rejected(_) => "failed",
        }
    }

    /// Whether the write may still have been applied.
    fn ambiguous(&self) -> bool {
        match self {
            Self::NotStarted => false,
            Self::TimedOut => true,
            Self::Rejected(e) => !matches!(e, kube::Error::Api(s) if s.code < 500),
        }
    }
}

/// One wave; `patched` counts each write as it is answered (not when the wave ends), so the metric never
/// lags what the API already shows.
async fn wave(ctx: &WaveContext<'_>, writes: Vec<&Write>, out: &mut Outcome) {
    // Owned futures (a stream of futures borrowing from here would not be `Send` for every lifetime), each
    // with its own copy of its write while in flight; the answers name their write by index, so a wave of
    // 10,000 never holds 10,000 copies.
    let ours = &out.versions;
    let results: Vec<(usize, Result<Option<Written>, WriteError>)> =
        futures::stream::iter(writes.clone().into_iter().cloned().enumerate())
            .map(|(i, mut w)| {
                if let Some(rv) = ours.get(&w.pod) {
                    w.resource_version = Some(rv.clone());
                }
                let (api, patched, left) = (ctx.api.clone(), ctx.patched.clone(), ctx.leadership.time_left());
                async move {
                    let Some(left) = left else { return (i, Err(WriteError::NotStarted)) };
                    // Only the written version is kept: a wave of 10,000 answers would otherwise hold 10,000 Pods.
                    let result = match tokio::time::timeout(left, patch(&api, &w, left)).await {
                        Ok(r) => r.map(|pod| pod.map(|p| Written::of(&p))).map_err(WriteError::Rejected),
                        Err(_) => Err(WriteError::TimedOut),
                    };
                    let label = match &result {
                        Ok(_) => "ok",
                        Err(e) => e.kind(),
                    };
                    patched.get_or_create(&ResultLabel { result: label.into() }).inc();
                    tracing::debug!(namespace = ?api.namespace(), pod = w.pod, links = ?w.to.as_deref().map(Assignment::links), ok = result.is_ok(), "Pod write");
                    (i, result)
                }
            })
            .buffer_unordered(ctx.concurrency.max(1))
            .collect()
            .await;
    let mut unsettled = Vec::new();
    for (i, result) in results {
        let w = writes[i];
        match result {
            Ok(pod) => {
                out.patched += 1;
                out.written.insert(w.pod.clone());
                if let Some(written) = pod {
                    if let Some(rv) = written.resource_version.filter(|_| written.uid == w.uid) {
                        out.versions.insert(w.pod.clone(), rv.to_string());
                    }
                    ctx.expectations.wrote(written);
                }
            }
            Err(error) => {
                out.lost_leadership |=
                    matches!(error, WriteError::NotStarted) || error.is_fenced() || !ctx.leadership.may_write();
                if error.ambiguous() {
                    unsettled.push(w);
                } else if error.is_stale() {
                    // The Pod changed since the version this write was conditional on (the decision's, or
                    // the one our shrink write left): the next decision waits until the cache shows it.
                    let sent = out.versions.get(&w.pod).or(w.resource_version.as_ref());
                    ctx.expectations.newer_than(ctx.api.namespace(), w, sent.map(String::as_str));
                }
                out.failed.insert(w.pod.clone(), error);
            }
        }
    }
    // A write that may have landed must show in the cache before the next decision.
    futures::future::join_all(unsettled.into_iter().map(|w| settle(ctx, w))).await;
}

/// After a write that may or may not have landed: the cache must show the Pod at least as it is now (read
/// directly), or, when it cannot be read, newer than the decision saw it.
async fn settle(ctx: &WaveContext<'_>, w: &Write) {
    let ns = ctx.api.namespace().map(str::to_owned);
    match tokio::time::timeout(Duration::from_secs(5), ctx.api.get_opt(&w.pod)).await {
        Ok(Ok(Some(pod))) if pod.uid() == w.uid => ctx.expectations.wrote(Written::of(&pod)),
        Ok(Ok(_)) => {}
        _ => ctx.expectations.newer_than(ns.as_deref(), w, w.resource_version.as_deref()),
    }
}

/// What a write's answer is kept for: the version of the Pod it produced.
struct Written {
    namespace: String,
    name: String,
    uid: Option<String>,
    resource_version: Option<u64>,
}

impl Written {
    fn of(pod: &Pod) -> Self {
        Self {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.uid(),
            resource_version: pod.resource_version().and_then(|rv| rv.parse().ok()),
        }
    }
}

/// One write, fenced by what its decision read: the Pod's UID and resourceVersion. A Pod that changed
/// since (a kubelet status update, another writer, a replacement under the same name) refuses it with a
/// 409, and the next reconcile decides again on the newer Pod; a late or repeated write is refused the
/// same way. `left` is the fence's time left, sent as the API server's own timeout for the request, so
/// a write this replica abandons is abandoned there too. `Ok(None)` when the Pod is gone (404): it needs
/// nothing, and the watch event replans.
async fn patch(api: &Api<Pod>, w: &Write, left: Duration) -> Result<Option<Pod>, kube::Error> {
    let mut meta = json!({"name": w.pod});
    for (key, value) in [("uid", &w.uid), ("resourceVersion", &w.resource_version)] {
        if let Some(v) = value {
            meta[key] = json!(v);
        }
    }
    let request = kube::core::Request::new(api.resource_url());
    let built = match &w.to {
        Some(a) => {
            meta["annotations"] = json!(a.to_annotations());
            let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta});
            request.patch(&w.pod, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        }
        None => {
            let removed: serde_json::Map<String, serde_json::Value> =
                assignment::KEYS.iter().map(|k| (k.to_string(), serde_json::Value::Null)).collect();
            meta["annotations"] = serde_json::Value::Object(removed);
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            request.patch(&w.pod, &params, &Patch::Merge(&json!({"metadata": meta})))
        }
    };
    let mut req = built.map_err(kube::Error::BuildRequest)?;
    let uri = req.uri().to_string();
    let separator = if uri.contains('?') { '&' } else { '?' };
    let uri = format!("{uri}{separator}timeout={}ms", left.as_millis().max(1));
    let invalid =
        |e: http::uri::InvalidUri| kube::Error::BuildRequest(kube::core::request::Error::BuildRequest(e.into()));
    *req.uri_mut() = uri.parse().map_err(invalid)?;
    req.extensions_mut().insert("patch");
    match api.clone().into_client().request::<Pod>(req).await {
        Ok(pod) => Ok(Some(pod)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

fn uid_mismatch(s: &kube::core::Status) -> bool {
    s.code == 422 && s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.field == "metadata.uid"))
}

/// A Pod's (UID, resourceVersion) in the cache, by name.
pub type CachedVersion<'a> = dyn Fn(&str) -> Option<(Option<String>, Option<String>)> + 'a;

/// Our own recent writes, until the Pod cache has caught up with each: a decision taken on a cache that
/// lags our writes could add a link next to one it does not see yet.
#[derive(Default)]
pub struct Expectations {
    pending: std::sync::Mutex<HashMap<(String, String), Expected>>,
}

struct Expected {
    uid: Option<String>,
    resource_version: u64,
    at: Instant,
}

impl Outcome {
    /// Whether `pod` ended on the target it was written (its writes all went through).
    pub fn reached(&self, pod: &str) -> bool {
        !self.lost_leadership
            && self.written.contains(pod)
            && !self.failed.contains_key(pod)
            && !self.held.iter().any(|h| h == pod)
    }
}

impl Expectations {
    /// A watch event is normally milliseconds behind its write; past this the expectation is dropped
    /// rather than stall the policy (the API server's resourceVersions are not ours to rely on forever).
    const PATIENCE: Duration = Duration::from_secs(30);

    /// Expects the cache to show `w`'s Pod newer than `seen`.
    fn newer_than(&self, namespace: Option<&str>, w: &Write, seen: Option<&str>) {
        let Some(rv) = seen.and_then(|rv| rv.parse::<u64>().ok()) else { return };
        let expected = Expected { uid: w.uid.clone(), resource_version: rv + 1, at: Instant::now() };
        let key = (namespace.unwrap_or_default().to_owned(), w.pod.clone());
        self.pending.lock().expect("expectations lock").insert(key, expected);
    }

    fn wrote(&self, w: Written) {
        let Some(rv) = w.resource_version else { return };
        let expected = Expected { uid: w.uid, resource_version: rv, at: Instant::now() };
        self.pending.lock().expect("expectations lock").insert((w.namespace, w.name), expected);
    }

    /// Whether the cache (`cached`: namespace and name → the cached Pod) shows every write made in
    /// `namespace`; settled expectations are forgotten.
    pub fn caught_up(&self, namespace: &str, cached: &CachedVersion) -> bool {
        let mut pending = self.pending.lock().expect("expectations lock");
        pending.retain(|(ns, pod), e| {
            if e.at.elapsed() > Self::PATIENCE {
                return false;
            }
            if ns != namespace {
                return true;
            }
            // Kept while the cache still shows an older version of the very Pod we wrote.
            match cached(pod) {
                Some((uid, Some(rv))) if uid == e.uid => rv.parse::<u64>().is_ok_and(|rv| rv < e.resource_version),
                _ => false,
            }
        });
        !pending.keys().any(|(ns, _)| ns == namespace)
    }
}
