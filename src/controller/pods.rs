//! The Pod cache: of each Pod, only what the controller reads, and only Pods it may act on. A Pod is
//! cached when a MeshPolicy of its namespace selects it or it carries an `agentmesh.dev/*` annotation;
//! every other Pod of a busy cluster is dropped as it arrives. What counts as interesting comes from the
//! policies ([`Interest`]): when it changes, the Pod watch starts over, and the cache is swapped whole
//! once the new list is complete.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{Selector, SelectorExt};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use crate::api::MeshPolicy;
use crate::assignment::{self, Assignment, Name};

/// A Pod as the cache keeps it: its identity, the labels and annotations the controller reads, and the
/// three status facts membership needs. No `ObjectMeta`: its sixteen optional fields would weigh more
/// than the five kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedPod {
    /// Shared by every later step that names the Pod: the maps keyed by it compare pointers.
    pub name: Name,
    /// Shared by the Pods of a namespace (see [`Sharing`]).
    pub namespace: Arc<str>,
    /// Shared with the decision's view of it ([`PodState`]).
    pub uid: Arc<str>,
    pub resource_version: Arc<str>,
    pub terminating: bool,
    pub node_name: Option<Box<str>>,
    pub pod_ip: Option<Box<str>>,
    pub ready: bool,
    /// The other annotations it keeps (the policies' node-id annotations, see [`Interest::keeps`]), as
    /// (key, value): a map per Pod would weigh more than the one or two entries it holds. Both shared: the
    /// key by every Pod, the node id with the assignments that name it.
    pub annotations: Vec<(Arc<str>, Arc<str>)>,
    /// Its assignment's annotations (`agentmesh.dev/peers`, `accepts`, `links`, `policy`), parsed once
    /// here, so each reconcile shares them instead of copying them.
    pub keys: Keys,
    /// The labels a policy's selector or `topologyKey` reads (see [`Interest::keeps_label`]), shared by
    /// the Pods that have the same ones: a map per Pod would weigh more than the Pod.
    pub labels: Arc<BTreeMap<String, String>>,
}

impl CachedPod {
    /// Keeps of `pod` what the controller reads: the assignment's keys, of its other annotations those
    /// `keep` accepts, and of its labels those `keep_label` accepts (shared through `shared`).
    pub fn new(pod: Pod, keep: &dyn Fn(&str) -> bool, keep_label: &dyn Fn(&str) -> bool, shared: &mut Shared) -> Self {
        let m = pod.metadata;
        let (mut keys, mut annotations) = (BTreeMap::new(), Vec::new());
        for (k, v) in m.annotations.unwrap_or_default() {
            if crate::assignment::KEYS.contains(&k.as_str()) {
                keys.insert(k, v);
            } else if keep(&k) {
                annotations.push((shared.names.share(k), shared.names.share(v)));
            }
        }
        let labels: BTreeMap<String, String> =
            m.labels.unwrap_or_default().into_iter().filter(|(k, _)| keep_label(k)).collect();
        let status = pod.status.unwrap_or_default();
        let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        Self {
            name: shared.names.share(m.name.unwrap_or_default()).into(),
            namespace: shared.namespaces.share(m.namespace.as_deref().unwrap_or_default()),
            uid: m.uid.unwrap_or_default().into(),
            resource_version: m.resource_version.unwrap_or_default().into(),
            terminating: m.deletion_timestamp.is_some(),
            node_name: pod.spec.and_then(|s| s.node_name).map(Into::into),
            pod_ip: status.pod_ip.filter(|ip| !ip.is_empty()).map(Into::into),
            ready,
            annotations,
            keys: Keys::new(keys).shared(&mut shared.names),
            labels: shared.labels.share(labels),
        }
    }

    /// The labels kept (see [`CachedPod::labels`]).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The value of a kept annotation (see [`CachedPod::annotations`]).
    pub fn annotation(&self, key: &str) -> Option<&Arc<str>> {
        self.annotations.iter().find(|(k, _)| &**k == key).map(|(_, v)| v)
    }

    /// Every annotation and label kept (for Pods read from the API rather than the cache).
    pub fn from_pod(pod: Pod) -> Self {
        Self::new(pod, &|_| true, &|_| true, &mut Shared::default())
    }
}

/// A kept string as the API's optional field: `None` when empty.
pub fn nonempty(s: &Arc<str>) -> Option<Arc<str>> {
    (!s.is_empty()).then(|| s.clone())
}

/// Whether the annotation key is one of ours.
fn ours(key: &str) -> bool {
    key.starts_with(crate::assignment::PREFIX)
}

/// Which Pods the cache keeps, derived from the MeshPolicies: per namespace, its policies' selectors, and
/// the node-id annotations they read. Annotations are only ever added (see [`Interest::widen`]): a cache
/// listed for an annotation keeps it from then on, so a reconcile can tell whether the cache it reads
/// holds its policy's node ids.
#[derive(Clone, Debug, Default)]
pub struct Interest {
    /// The policies' selectors as written, sorted: with `annotations`, what decides whether two
    /// interests are the same.
    key: Vec<(String, String)>,
    selectors: BTreeMap<String, Vec<Selector>>,
    annotations: BTreeSet<String>,
    /// The label keys the policies' selectors and topology keys read; only ever added, as annotations.
    labels: BTreeSet<String>,
}

impl PartialEq for Interest {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.annotations == other.annotations && self.labels == other.labels
    }
}

/// The label keys policy `p` reads of a Pod: its selector's and its `topologyKey`.
pub fn label_keys(p: &MeshPolicy) -> impl Iterator<Item = &str> {
    let selector = &p.spec.selector;
    let matched = selector.match_labels.iter().flat_map(|m| m.keys());
    let expressions = selector.match_expressions.iter().flatten().map(|e| &e.key);
    matched.chain(expressions).chain(&p.spec.topology_key).map(String::as_str)
}

/// What cached Pods share: one label map per distinct set kept, one string per namespace, and one copy of
/// each node id and URL their assignments name (each is named by about 3k other Pods).
#[derive(Debug, Default)]
pub struct Shared {
    labels: Sharing<BTreeMap<String, String>>,
    namespaces: Sharing<str>,
    names: Sharing<str>,
}

/// Values shared by the cached Pods that have equal ones.
#[derive(Debug)]
struct Sharing<T: ?Sized> {
    values: std::collections::HashSet<Arc<T>>,
    /// The values some Pod held at the last sweep.
    live: usize,
}

impl<T: ?Sized> Default for Sharing<T> {
    fn default() -> Self {
        Self { values: Default::default(), live: 0 }
    }
}

impl<T: ?Sized + Eq + std::hash::Hash> Sharing<T> {
    fn share<Q>(&mut self, value: Q) -> Arc<T>
    where
        Q: std::borrow::Borrow<T>,
        Arc<T>: From<Q>,
    {
        if let Some(shared) = self.values.get(value.borrow()) {
            return shared.clone();
        }
        // Values no Pod holds any more are swept once the table doubles past the live ones: Pods with
        // ever new label values (or namespaces, or node ids) cannot grow it without bound.
        if self.values.len() >= 2 * self.live + 1024 {
            self.values.retain(|v| Arc::strong_count(v) > 1);
            self.live = self.values.len();
        }
        let shared: Arc<T> = Arc::from(value);
        self.values.insert(shared.clone());
        shared
    }
}

impl Interest {
    pub fn of(policies: &[Arc<MeshPolicy>]) -> Self {
        let mut out = Interest::default();
        for p in policies {
            let ns = p.namespace().unwrap_or_default();
            let written = serde_json::to_string(&p.spec.selector).unwrap_or_default();
            out.key.push((ns.clone(), written));
            // An unusable selector selects nothing (the policy reports it as invalid).
            if let Ok(s) = Selector::try_from(p.spec.selector.clone()) {
                out.selectors.entry(ns).or_default().push(s);
            }
            out.annotations.insert(p.spec.identity.node_id_annotation.clone());
            out.labels.extend(label_keys(p).map(str::to_owned));
        }
        out.key.sort();
        out
    }

    /// This interest, also keeping every annotation `earlier` kept.
    pub fn widen(mut self, earlier: Option<&Interest>) -> Self {
        self.annotations.extend(earlier.iter().flat_map(|e| e.annotations.iter().cloned()));
        self.labels.extend(earlier.iter().flat_map(|e| e.labels.iter().cloned()));
        self
    }

    /// Whether the cache keeps the label `key` of its Pods: one a policy's selector or `topologyKey` reads.
    /// Like annotations, a key once kept stays kept.
    pub fn keeps_label(&self, key: &str) -> bool {
        self.labels.contains(key)
    }

    /// Whether an annotation (besides the assignment's keys, always kept) is read by the controller: a
    /// policy's node-id annotation. The default one is always kept, so a new policy using it need not wait
    /// for a relist; other `agentmesh.dev/*` keys are not (a Pod could carry thousands).
    pub fn keeps(&self, key: &str) -> bool {
        key == crate::assignment::NODE_ID || self.annotations.contains(key)
    }

    /// Whether the cache keeps `pod`.
    pub fn wants(&self, pod: &Pod) -> bool {
        pod.annotations().keys().any(|k| ours(k))
            || self.selectors.get(pod.namespace().as_deref().unwrap_or_default()).is_some_and(|ss| {
                let labels = pod.labels();
                ss.iter().any(|s| s.matches(labels))
            })
    }

    /// `event` as the cache takes it: an uninteresting Pod is dropped from the initial list, and an
    /// update that makes a Pod uninteresting removes it.
    fn filter(&self, event: watcher::Event<Pod>, shared: &mut Shared) -> Option<watcher::Event<Arc<CachedPod>>> {
        use watcher::Event::*;
        let (keep, keep_label) = (|k: &str| self.keeps(k), |k: &str| self.keeps_label(k));
        let mut cached = |pod| Arc::new(CachedPod::new(pod, &keep, &keep_label, shared));
        Some(match event {
            Apply(pod) if self.wants(&pod) => Apply(cached(pod)),
            Apply(pod) | Delete(pod) => Delete(cached(pod)),
            InitApply(pod) if self.wants(&pod) => InitApply(cached(pod)),
            InitApply(_) => return None,
            Init => Init,
            InitDone => InitDone,
        })
    }
}

/// Whether the Pod cache sees Pod events as they happen: not while it is being listed (at the start, after
/// its selectors change, after a watch expired), when events stop until the list is complete.
#[derive(Debug, Default)]
pub struct Sight(std::sync::Mutex<Listed>);

#[derive(Clone, Copy, Debug, Default)]
enum Listed {
    #[default]
    Never,
    Listing,
    At(std::time::Instant),
}

impl Sight {
    pub fn listing(&self) {
        *self.0.lock().expect("sight lock") = Listed::Listing;
    }

    pub fn listed(&self, at: std::time::Instant) {
        *self.0.lock().expect("sight lock") = Listed::At(at);
    }

    /// Until when the cache saw nothing: `now` while it is being listed, else when its last list completed.
    pub fn blind_until(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        match *self.0.lock().expect("sight lock") {
            Listed::Never => None,
            Listed::Listing => Some(now),
            Listed::At(at) => Some(at),
        }
    }
}

/// Restarts of the Pod watch are at least this far apart: each lists every Pod in scope, and a policy
/// edited in a loop must not keep the operator listing.
pub const RELIST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The Pod watch: it starts once `interest` is known (the policies are listed) and starts over when that
/// changes, at most once per [`RELIST_INTERVAL`], with the latest interest. Until a new list is complete
/// the cache keeps the previous one, which holds every Pod carrying our keys; what it may lack (Pods a
/// policy has just begun to select) is planned once the list completes. Each event carries the interest
/// its list was made with.
pub fn watch(
    api: Api<Pod>,
    config: watcher::Config,
    interest: tokio::sync::watch::Receiver<Option<Interest>>,
) -> impl Stream<Item = Result<(watcher::Event<Arc<CachedPod>>, Arc<Interest>), watcher::Error>> + Send {
    let state =
        Relists { inner: None, interest, open: true, last_start: None, restart_at: None, shared: Default::default() };
    futures::stream::unfold(state, move |mut st| {
        let (api, config) = (api.clone(), config.clone());
        async move {
            loop {
                let next = async {
                    match st.inner.as_mut() {
                        Some((stream, _)) => stream.next().await,
                        None => std::future::pending().await,
                    }
                };
                let due = async {
                    match st.restart_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = st.interest.changed(), if st.open => st.interest_changed(changed.is_ok()),
                    () = due => st.restart(&api, &config),
                    item = next => match item? {
                        Ok(event) => {
                            let current = st.inner.as_ref().expect("an item comes from a started watch").1.clone();
                            if let Some(event) = current.filter(event, &mut st.shared) {
                                return Some((Ok((event, current)), st));
                            }
                        }
                        Err(e) => return Some((Err(e), st)),
                    }
                }
            }
        }
    })
}

type PodEvents = futures::stream::BoxStream<'static, Result<watcher::Event<Pod>, watcher::Error>>;

/// The Pod watch's state between events: the watch running (with the interest it lists for), and when
/// the next relist is due.
struct Relists {
    inner: Option<(PodEvents, Arc<Interest>)>,
    interest: tokio::sync::watch::Receiver<Option<Interest>>,
    open: bool,
    last_start: Option<tokio::time::Instant>,
    restart_at: Option<tokio::time::Instant>,
    shared: Shared,
}

impl Relists {
    /// A new interest differing from the running watch's schedules a relist, no sooner than
    /// [`RELIST_INTERVAL`] after the last.
    fn interest_changed(&mut self, open: bool) {
        self.open = open;
        let new = self.interest.borrow_and_update().clone();
        let differs = |new: &Interest| self.inner.as_ref().is_none_or(|(_, current)| **current != *new);
        if new.as_ref().is_some_and(differs) {
            let earliest = self.last_start.map(|t| t + RELIST_INTERVAL);
            self.restart_at = Some(earliest.unwrap_or_else(tokio::time::Instant::now));
        }
    }

    fn restart(&mut self, api: &Api<Pod>, config: &watcher::Config) {
        self.restart_at = None;
        let Some(new) = self.interest.borrow().clone() else { return };
        if self.inner.is_some() {
            tracing::info!("the policies' selectors changed: relisting Pods");
        }
        self.last_start = Some(tokio::time::Instant::now());
        self.inner = Some((watcher(api.clone(), config.clone()).default_backoff().boxed(), Arc::new(new)));
    }
}

/// One Pod as the decision sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodState {
    /// These three shared with the Pod cache.
    pub uid: Option<Arc<str>>,
    pub resource_version: Option<Arc<str>>,
    /// Its agent's node id, when known.
    pub node_id: Option<Arc<str>>,
    /// The `agentmesh.dev/*` annotations it carries, shared with the Pod cache.
    pub keys: Keys,
}

impl PodState {
    /// A Pod carrying `keys` (parsed here; the controller's cache parses each Pod once, when it changes).
    pub fn with_keys(keys: BTreeMap<String, String>) -> Self {
        Self { keys: Keys::new(keys), ..Default::default() }
    }

    /// Whether the Pod carries exactly `want`.
    pub fn carries(&self, want: &Assignment) -> bool {
        self.keys.exact().map(Arc::as_ref) == Some(want)
    }

    /// The assignment it carries if it is `policy`'s: named so, or (when `stray_is_ours`) naming no policy
    /// at all while carrying some of the keys, as a Pod created with them does.
    pub fn carried(&self, policy: &str, stray_is_ours: bool) -> Option<Arc<Assignment>> {
        match self.keys.policy() {
            Some(p) if p == policy => self.keys.lenient(),
            None if stray_is_ours && !self.keys.is_empty() => self.keys.stray_as(policy),
            _ => None,
        }
    }
}

/// The `agentmesh.dev/*` annotations of a Pod. Well-formed ones (as an agent reads them, see
/// [`Assignment::from_annotations_strict`]) are kept parsed only: a target equal to them needs no write,
/// and their JSON would double the Pod cache. Anything else is kept as written, for what a lenient read
/// recovers.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Keys {
    #[default]
    None,
    Exact(Arc<Assignment>),
    Raw(Arc<BTreeMap<String, String>>),
}

impl Keys {
    pub fn new(keys: BTreeMap<String, String>) -> Self {
        if keys.is_empty() {
            return Keys::None;
        }
        match Assignment::from_annotations_strict(&keys) {
            Ok(Some(a)) => Keys::Exact(Arc::new(a)),
            _ => Keys::Raw(Arc::new(keys)),
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Keys::None)
    }

    /// The well-formed assignment they carry.
    pub fn exact(&self) -> Option<&Arc<Assignment>> {
        match self {
            Keys::Exact(a) => Some(a),
            _ => None,
        }
    }

    /// The policy they name (a well-formed assignment always names one).
    pub fn policy(&self) -> Option<&str> {
        match self {
            Keys::None => None,
            Keys::Exact(a) => Some(&a.policy),
            Keys::Raw(keys) => keys.get(assignment::POLICY).map(String::as_str),
        }
    }

    /// What they say when they name a policy, read leniently (see [`Assignment::from_annotations`]).
    pub fn lenient(&self) -> Option<Arc<Assignment>> {
        match self {
            Keys::None => None,
            Keys::Exact(a) => Some(a.clone()),
            Keys::Raw(keys) => Assignment::from_annotations(keys).map(Arc::new),
        }
    }

    /// What they say read as `policy`'s (for keys that name no policy).
    fn stray_as(&self, policy: &str) -> Option<Arc<Assignment>> {
        let Keys::Raw(keys) = self else { return self.lenient() };
        let mut keys = (**keys).clone();
        keys.insert(assignment::POLICY.into(), policy.into());
        Assignment::from_annotations(&keys).map(Arc::new)
    }

    /// The same keys, naming node ids and URLs through `names`' shared copies.
    fn shared(mut self, names: &mut Sharing<str>) -> Self {
        if let Keys::Exact(a) = &mut self {
            let a = Arc::get_mut(a).expect("parsed just now");
            for name in a.names_mut() {
                *name = names.share(name.clone()).into();
            }
        }
        self
    }

    /// The same keys without the policy name (never well-formed, so kept as written).
    pub fn without_policy(&self) -> Keys {
        let mut keys: BTreeMap<String, String> = match self {
            Keys::None => return Keys::None,
            Keys::Exact(a) => a.to_annotations().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            Keys::Raw(keys) => (**keys).clone(),
        };
        keys.remove(assignment::POLICY);
        Keys::new(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": ns, "labels": labels, "annotations": annotations,
                "managedFields": [{"manager": "kubectl"}], "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "u"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "x"}]}]},
            "status": {"podIP": "10.0.0.1", "phase": "Running",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .unwrap()
    }

    fn policy(ns: &str, selector: serde_json::Value, node_id_annotation: &str) -> Arc<MeshPolicy> {
        Arc::new(
            serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
                "metadata": {"name": "m", "namespace": ns},
                "spec": {"selector": selector, "rendezvous": {"url": "http://rv"},
                    "identity": {"nodeIdAnnotation": node_id_annotation}}}))
            .unwrap(),
        )
    }

    #[test]
    fn keeps_only_what_the_controller_reads() {
        let interest = Interest::of(&[policy("a", json!({"matchLabels": {"app": "agent"}}), "example.com/id")]);
        let annotations = json!({"example.com/id": "n1", "agentmesh.dev/peers": "[]", "agentmesh.dev/node-id": "n0",
            "agentmesh.dev/other": "x", "kubectl.kubernetes.io/last-applied-configuration": "{…}"});
        let mut shared = Shared::default();
        let labels = json!({"app": "agent", "pod-template-hash": "5d8f", "zone": "z1"});
        let cached = |shared: &mut Shared| {
            let p = pod("a", labels.clone(), annotations.clone());
            CachedPod::new(p, &|k| interest.keeps(k), &|k| interest.keeps_label(k), shared)
        };
        let (p, twin) = (cached(&mut shared), cached(&mut shared));
        assert_eq!(*p.labels, BTreeMap::from([("app".to_string(), "agent".to_string())]), "only what a selector reads");
        assert!(Arc::ptr_eq(&p.labels, &twin.labels), "equal label sets are shared");
        assert!(Arc::ptr_eq(&p.namespace, &twin.namespace), "a namespace is shared");
        let kept: Vec<&str> = p.annotations.iter().map(|(k, _)| &**k).collect();
        assert_eq!(
            kept,
            ["agentmesh.dev/node-id", "example.com/id"],
            "node ids only: the default one, and the policy's"
        );
        let peers_only = BTreeMap::from([("agentmesh.dev/peers".to_string(), "[]".to_string())]);
        assert_eq!(p.keys, Keys::Raw(Arc::new(peers_only)), "half an assignment is kept as written");
        assert_eq!((p.pod_ip.as_deref(), p.node_name.as_deref(), p.ready), (Some("10.0.0.1"), Some("n1"), true));
    }

    /// Each node id and URL is kept once however many assignments name it: with standbys, copies were
    /// more than half of the cache.
    #[test]
    fn names_are_kept_once_across_pods() {
        let interest = Interest::of(&[policy("a", json!({"matchLabels": {"app": "agent"}}), "agentmesh.dev/node-id")]);
        let peer = |id: &str| assignment::Peer { node_id: id.into(), url: format!("ws://{id}/").into() };
        let standby =
            assignment::Standby { node_id: "n3".into(), url: "ws://n3/".into(), stands_for: "n2".into(), rank: 1 };
        let mut shared = Shared::default();
        let mut cached = |node_id: &str, peers: Vec<assignment::Peer>, standbys: Vec<assignment::Standby>| {
            let a = Assignment::new(peers, [], "m".into()).with_max_peers(4).with_standbys(standbys, []);
            let mut annotations: serde_json::Map<String, serde_json::Value> =
                a.to_annotations().into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
            annotations.insert(assignment::NODE_ID.into(), node_id.into());
            let p = pod("a", json!({"app": "agent"}), annotations.into());
            CachedPod::new(p, &|k| interest.keeps(k), &|k| interest.keeps_label(k), &mut shared)
        };
        let one = cached("n1", vec![peer("n2")], vec![standby.clone()]);
        let two = cached("n4", vec![peer("n2"), peer("n3")], vec![]);
        let three = cached("n3", vec![], vec![]);
        let (a, b) = (one.keys.exact().unwrap(), two.keys.exact().unwrap());
        assert!(a.peers[0].node_id.is_shared_with(&b.peers[0].node_id), "a peer's node id");
        assert!(a.peers[0].url.is_shared_with(&b.peers[0].url), "a peer's URL");
        assert!(a.standbys[0].node_id.is_shared_with(&b.peers[1].node_id), "a standby and a peer");
        assert!(a.standbys[0].stands_for.is_shared_with(&a.peers[0].node_id), "whom a standby stands for");
        let own = three.annotation(assignment::NODE_ID).unwrap();
        assert!(Arc::ptr_eq(own, &Arc::from(b.peers[1].node_id.clone())), "a Pod's own node id and those naming it");
        // Each version of one Pod: the view's maps merge by this name, comparing pointers.
        assert!(one.name.is_shared_with(&two.name), "a Pod's name");
    }

    /// Pods with ever new label values (a kept key under churn, or a hostile creator) cannot grow the
    /// shared label table without bound: sets no Pod holds are swept.
    #[test]
    fn the_shared_label_table_stays_near_the_live_sets() {
        let mut shared = Sharing::default();
        let set = |i: usize| BTreeMap::from([("app".to_string(), format!("v{i}"))]);
        let held: Vec<_> = (0..300).map(|i| shared.share(set(i))).collect();
        for i in 300..20_000 {
            drop(shared.share(set(i)));
            assert!(shared.values.len() <= 2 * 300 + 1024 + 1, "{} sets after {i}", shared.values.len());
        }
        assert!(Arc::ptr_eq(&held[7], &shared.share(set(7))), "live sets stay shared");
    }

    #[test]
    fn caches_selected_pods_and_pods_carrying_our_keys_only() {
        let interest = Interest::of(&[policy("a", json!({"matchLabels": {"app": "agent"}}), "agentmesh.dev/node-id")]);
        let cases = [
            ("a", json!({"app": "agent"}), json!({}), true),
            ("a", json!({"app": "web"}), json!({}), false),
            ("b", json!({"app": "agent"}), json!({}), false),
            ("b", json!({"app": "web"}), json!({"agentmesh.dev/policy": "gone"}), true),
            ("b", json!({}), json!({"example.com/other": "x"}), false),
        ];
        for (ns, labels, annotations, want) in cases {
            let p = pod(ns, labels.clone(), annotations.clone());
            assert_eq!(interest.wants(&p), want, "{ns} {labels} {annotations}");
            let listed = interest.filter(watcher::Event::InitApply(p.clone()), &mut Shared::default());
            assert_eq!(listed.is_some(), want, "listed: {ns} {labels}");
            let applied = interest.filter(watcher::Event::Apply(p), &mut Shared::default());
            assert_eq!(matches!(applied, Some(watcher::Event::Apply(_))), want, "applied: {ns} {labels}");
        }
    }

    #[test]
    fn interests_differ_only_when_selectors_annotations_or_label_keys_do() {
        let sel = json!({"matchLabels": {"app": "agent"}});
        let one = Interest::of(&[policy("a", sel.clone(), "agentmesh.dev/node-id")]);
        assert_eq!(one, Interest::of(&[policy("a", sel.clone(), "agentmesh.dev/node-id")]));
        assert_ne!(one, Interest::of(&[policy("a", sel.clone(), "example.com/id")]));
        assert_ne!(one, Interest::of(&[policy("b", sel.clone(), "agentmesh.dev/node-id")]));
        assert_ne!(one, Interest::of(&[]));
        assert_ne!(one, Interest::of(&[policy("a", json!({"matchLabels": {"tier": "ci"}}), "agentmesh.dev/node-id")]));
        let moved = Interest::of(&[policy(
            "a",
            json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
            "example.com/id",
        )])
        .widen(Some(&one));
        assert!(moved.keeps("agentmesh.dev/node-id") && moved.keeps("example.com/id"), "annotations are only added");
        assert!(moved.keeps_label("app") && moved.keeps_label("tier"), "label keys are only added");
    }

    #[test]
    fn keys_are_kept_parsed_when_well_formed_and_as_written_otherwise() {
        let a = Assignment::new(
            vec![assignment::Peer { node_id: "n1".into(), url: "ws://n1/".into() }],
            ["n2".into()],
            "p".into(),
        );
        let written = |a: &Assignment| -> BTreeMap<String, String> {
            a.to_annotations().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
        };
        let exact = Keys::new(written(&a));
        assert_eq!(exact, Keys::Exact(Arc::new(a.clone())));
        assert_eq!((exact.policy(), exact.lenient().as_deref()), (Some("p"), Some(&a)));
        let mut bad_count = written(&a);
        bad_count.insert(assignment::LINKS.into(), "9".into());
        let raw = Keys::new(bad_count);
        assert!(matches!(raw, Keys::Raw(_)) && raw.exact().is_none());
        assert_eq!((raw.policy(), raw.lenient().as_deref()), (Some("p"), Some(&a)), "read leniently, as before");
        let unnamed = exact.without_policy();
        assert!(matches!(unnamed, Keys::Raw(_)) && unnamed.policy().is_none());
        let stray = PodState { keys: unnamed, ..Default::default() };
        assert_eq!(stray.carried("q", true).as_deref(), Some(&Assignment { policy: "q".into(), ..a.clone() }));
        assert_eq!(stray.carried("q", false), None);
        assert_eq!(Keys::new(BTreeMap::new()), Keys::None);
        assert_eq!(Keys::None.without_policy(), Keys::None);
    }
}
