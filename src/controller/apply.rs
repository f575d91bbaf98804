//! Apply: carries out the waves [`decide`](super::decide) chose. Assignments go by server-side apply under
//! one field manager; removals by a merge patch that deletes every `agentmesh.dev/*` key, whoever wrote it
//! (an apply of `{}` would only drop the keys this manager owns). Each write names the Pod's UID, so it
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
use serde_json::json;

use super::FIELD_MANAGER;
use super::decide::{Waves, Write};
use crate::assignment;

/// What applying the waves did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub patched: usize,
    /// Pods written successfully (in any wave).
    pub written: std::collections::BTreeSet<String>,
    /// Pods whose write failed, with the API's answer.
    pub failed: BTreeMap<String, String>,
    /// Pods whose grow write was held back because a shrink write it depends on failed.
    pub held: Vec<String>,
    /// Leadership was lost before a wave: nothing more was written.
    pub lost_leadership: bool,
}

/// Applies `waves`: every shrink write, then the grow writes that stay safe given which shrink writes
/// failed. `may_write` is asked before each wave.
pub async fn apply(
    api: &Api<Pod>,
    waves: &Waves,
    concurrency: usize,
    may_write: &(dyn Fn() -> bool + Sync),
    expectations: &Expectations,
    patched: &Counter,
) -> Outcome {
    let mut outcome = Outcome::default();
    if !may_write() {
        outcome.lost_leadership = !waves.is_empty();
        return outcome;
    }
    wave(api, waves.shrink.iter().collect(), concurrency, expectations, patched, &mut outcome).await;
    let failed: HashSet<String> = outcome.failed.keys().cloned().collect();
    let (grow, held) = waves.grow_after(&failed);
    outcome.held = held.into_iter().map(str::to_owned).collect();
    if grow.is_empty() {
        return outcome;
    }
    if !may_write() {
        outcome.lost_leadership = true;
        return outcome;
    }
    wave(api, grow, concurrency, expectations, patched, &mut outcome).await;
    outcome
}

/// One wave; `patched` counts each write as it succeeds (not when the wave ends), so the metric never
/// lags what the API already shows.
async fn wave(
    api: &Api<Pod>,
    writes: Vec<&Write>,
    concurrency: usize,
    exp: &Expectations,
    patched: &Counter,
    out: &mut Outcome,
) {
    // Owned futures: a stream of futures borrowing from here would not be `Send` for every lifetime.
    let results: Vec<(Write, Result<Option<Pod>, kube::Error>)> = futures::stream::iter(writes.into_iter().cloned())
        .map(|w| {
            let (api, patched) = (api.clone(), patched.clone());
            async move {
                let result = patch(&api, &w).await;
                if result.is_ok() {
                    patched.inc();
                }
                (w, result)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for (w, result) in results {
        match result {
            Ok(pod) => {
                out.patched += 1;
                out.written.insert(w.pod.clone());
                if let Some(pod) = pod {
                    exp.wrote(api_namespace(&pod), &pod);
                }
            }
            Err(e) => {
                out.failed.insert(w.pod.clone(), e.to_string());
            }
        }
    }
}

fn api_namespace(pod: &Pod) -> String {
    pod.namespace().unwrap_or_default()
}

/// One write. `Ok(None)` when the Pod the decision saw is gone (404, 409 on the UID precondition) or
/// was replaced (422 on the immutable UID): it needs nothing, and its successor's watch event replans.
async fn patch(api: &Api<Pod>, w: &Write) -> Result<Option<Pod>, kube::Error> {
    let result = match &w.to {
        Some(a) => {
            let body = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": w.pod, "uid": w.uid, "annotations": a.to_annotations()}});
            api.patch(&w.pod, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await
        }
        None => {
            let removed: serde_json::Map<String, serde_json::Value> =
                assignment::KEYS.iter().map(|k| (k.to_string(), serde_json::Value::Null)).collect();
            let body = json!({"metadata": {"uid": w.uid, "annotations": removed}});
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            api.patch(&w.pod, &params, &Patch::Merge(&body)).await
        }
    };
    match result {
        Ok(pod) => Ok(Some(pod)),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 || uid_mismatch(&s) => Ok(None),
        Err(e) => Err(e),
    }
}

fn uid_mismatch(s: &kube::core::Status) -> bool {
    s.code == 422 && s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.field == "metadata.uid"))
}

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
        !self.lost_leadership && self.written.contains(pod) && !self.failed.contains_key(pod) && !self.held.iter().any(|h| h == pod)
    }
}

impl Expectations {
    /// A watch event is normally milliseconds behind its write; past this the expectation is dropped
    /// rather than stall the policy (the API server's resourceVersions are not ours to rely on forever).
    const PATIENCE: Duration = Duration::from_secs(30);

    fn wrote(&self, namespace: String, pod: &Pod) {
        let Some(rv) = pod.resource_version().and_then(|rv| rv.parse().ok()) else { return };
        let expected = Expected { uid: pod.uid(), resource_version: rv, at: Instant::now() };
        self.pending.lock().expect("expectations lock").insert((namespace, pod.name_any()), expected);
    }

    /// Whether the cache (`cached`: namespace and name → the cached Pod) shows every write made in
    /// `namespace`; settled expectations are forgotten.
    pub fn caught_up(&self, namespace: &str, cached: &dyn Fn(&str) -> Option<(Option<String>, Option<String>)>) -> bool {
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
