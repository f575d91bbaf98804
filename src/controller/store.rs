//! The Pod cache's store and its change log. Every Pod event reaches the store through
//! [`PodStore::apply`], which updates the store and records the Pod in one step under one lock; a reader
//! takes the Pods changed since its cursor, with their cached state, under the same lock. So a reader
//! never sees a store change without its record, or a record without its change, and replaying what it
//! is given keeps its own view equal to the store's. A relist replaces the store whole: every reader
//! starts over, as it does when its cursor fell behind the bounded log.
//!
//! The store keeps Pods by namespace, then name: a reconcile reads its own namespace, not the cluster's,
//! and an entry's key is its name alone (the namespace is shared by all of its Pods and their records).
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use kube::runtime::watcher;

use super::pods::CachedPod;
use crate::assignment::Name;

/// The records kept: a reader further behind than this starts over. A burst of 10,000 Pods fits.
const LOG_LIMIT: usize = 1 << 16;

/// A reader's position in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    epoch: u64,
    seq: u64,
}

/// What changed in one namespace since a cursor.
pub enum Since {
    /// The store was replaced (or the reader fell behind): every Pod of the namespace, as cached now.
    Everything(Vec<Arc<CachedPod>>),
    /// The Pods that changed, each as cached now (`None`: gone).
    Pods(Vec<(Name, Option<Arc<CachedPod>>)>),
}

/// One read: what changed, the cursor to read from next, and (when asked for, to check an incremental
/// view against a full one) every Pod of the namespace as of the same instant.
pub struct Batch {
    pub since: Since,
    pub cursor: Cursor,
    pub all: Option<Vec<Arc<CachedPod>>>,
}

/// Pods by namespace, then name.
type Namespaces = HashMap<Arc<str>, BTreeMap<Name, Arc<CachedPod>>>;

pub struct PodStore {
    inner: Mutex<Inner>,
    /// Set once the store holds a complete list.
    listed: tokio::sync::watch::Sender<bool>,
}

impl Default for PodStore {
    fn default() -> Self {
        Self { inner: Mutex::default(), listed: tokio::sync::watch::Sender::new(false) }
    }
}

#[derive(Default)]
struct Inner {
    pods: Namespaces,
    /// A relist's Pods, swapped in whole once it is complete.
    relist: Namespaces,
    log: Log,
}

#[derive(Default)]
struct Log {
    /// Bumped by every relist: cursors from an earlier epoch start over.
    epoch: u64,
    /// The sequence number of the next record.
    seq: u64,
    /// The last [`LOG_LIMIT`] records: (namespace, Pod name), the oldest at `seq - records.len()`.
    records: VecDeque<(Arc<str>, Name)>,
}

/// Puts `pod` into `pods` when `keep`, else takes out the entry of its name.
fn put(pods: &mut Namespaces, pod: &Arc<CachedPod>, keep: bool) {
    if keep {
        pods.entry(Arc::clone(&pod.namespace)).or_default().insert(pod.name.clone(), Arc::clone(pod));
    } else if let Some(names) = pods.get_mut(&*pod.namespace) {
        names.remove(&pod.name);
        if names.is_empty() {
            pods.remove(&*pod.namespace);
        }
    }
}

impl PodStore {
    /// Applies `event` to the store and records the Pod it changed, as one step.
    pub fn apply(&self, event: &watcher::Event<Arc<CachedPod>>) {
        let mut inner = self.inner.lock().expect("pod store lock");
        let inner = &mut *inner;
        match event {
            watcher::Event::Apply(pod) | watcher::Event::Delete(pod) => {
                put(&mut inner.pods, pod, matches!(event, watcher::Event::Apply(_)));
                let log = &mut inner.log;
                if log.records.len() == LOG_LIMIT {
                    log.records.pop_front();
                }
                log.records.push_back((Arc::clone(&pod.namespace), pod.name.clone()));
                log.seq += 1;
            }
            watcher::Event::Init => inner.relist = Namespaces::new(),
            watcher::Event::InitApply(pod) => put(&mut inner.relist, pod, true),
            watcher::Event::InitDone => {
                inner.pods = std::mem::take(&mut inner.relist);
                inner.log.epoch += 1;
                inner.log.records.clear();
                self.listed.send_replace(true);
            }
        }
    }

    /// What changed in `ns` since `cursor` (everything, without one); with `all`, also every Pod of `ns`
    /// at the same instant.
    pub fn read(&self, ns: &str, cursor: Option<Cursor>, all: bool) -> Batch {
        let inner = self.inner.lock().expect("pod store lock");
        let log = &inner.log;
        let now = Cursor { epoch: log.epoch, seq: log.seq };
        let everything = || inner.pods.get(ns).map(|names| names.values().cloned().collect()).unwrap_or_default();
        let oldest = log.seq - log.records.len() as u64;
        let since = match cursor {
            Some(c) if c.epoch == log.epoch && c.seq >= oldest => {
                let skip = (c.seq - oldest) as usize;
                let names: BTreeSet<&Name> =
                    log.records.iter().skip(skip).filter(|(n, _)| **n == *ns).map(|(_, name)| name).collect();
                let get = |name: &Name| inner.pods.get(ns)?.get(name).cloned();
                Since::Pods(names.into_iter().map(|name| (name.clone(), get(name))).collect())
            }
            _ => Since::Everything(everything()),
        };
        Batch { since, cursor: now, all: all.then(everything) }
    }

    /// Every Pod of namespace `ns`, by name.
    pub fn namespace(&self, ns: &str) -> Vec<Arc<CachedPod>> {
        let inner = self.inner.lock().expect("pod store lock");
        inner.pods.get(ns).map(|names| names.values().cloned().collect()).unwrap_or_default()
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<CachedPod>> {
        self.inner.lock().expect("pod store lock").pods.get(ns)?.get(name).cloned()
    }

    /// Waits until the store holds a complete list.
    pub async fn listed(&self) {
        let _ = self.listed.subscribe().wait_for(|listed| *listed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s_pod(name: &str, ns: &str, rv: &str) -> k8s_openapi::api::core::v1::Pod {
        let pod = serde_json::json!({"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}});
        serde_json::from_value(pod).unwrap()
    }

    fn pod(name: &str, ns: &str, rv: &str) -> Arc<CachedPod> {
        Arc::new(CachedPod::from_pod(k8s_pod(name, ns, rv)))
    }

    fn cached(event: &watcher::Event<k8s_openapi::api::core::v1::Pod>) -> watcher::Event<Arc<CachedPod>> {
        let pod = |p: &k8s_openapi::api::core::v1::Pod| Arc::new(CachedPod::from_pod(p.clone()));
        match event {
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitApply(p) => watcher::Event::InitApply(pod(p)),
            watcher::Event::InitDone => watcher::Event::InitDone,
            watcher::Event::Apply(p) => watcher::Event::Apply(pod(p)),
            watcher::Event::Delete(p) => watcher::Event::Delete(pod(p)),
        }
    }

    /// A Pod's name and resource version.
    fn id(p: &CachedPod) -> (String, String) {
        (p.name.to_string(), p.resource_version.to_string())
    }

    fn names(since: &Since) -> Vec<(String, Option<String>)> {
        match since {
            Since::Everything(pods) => {
                let mut v: Vec<_> = pods.iter().map(|p| id(p)).map(|(n, rv)| (n, Some(rv))).collect();
                v.sort();
                v
            }
            Since::Pods(pods) => pods.iter().map(|(n, p)| (n.to_string(), p.as_deref().map(|p| id(p).1))).collect(),
        }
    }

    #[test]
    fn a_reader_gets_each_changed_pod_once_as_cached_now_and_starts_over_after_a_relist() {
        let store = PodStore::default();
        for e in [watcher::Event::Init, watcher::Event::InitApply(pod("a", "ci", "1")), watcher::Event::InitDone] {
            store.apply(&e);
        }
        let first = store.read("ci", None, false);
        assert_eq!(names(&first.since), vec![("a".into(), Some("1".into()))], "no cursor: everything");
        store.apply(&watcher::Event::Apply(pod("b", "ci", "2")));
        store.apply(&watcher::Event::Apply(pod("b", "ci", "3")));
        store.apply(&watcher::Event::Apply(pod("x", "other", "4")));
        store.apply(&watcher::Event::Delete(pod("a", "ci", "5")));
        let next = store.read("ci", Some(first.cursor), true);
        assert_eq!(names(&next.since), vec![("a".into(), None), ("b".into(), Some("3".into()))]);
        assert_eq!(next.all.as_ref().map(Vec::len), Some(1), "b alone is left in ci");
        let quiet = store.read("ci", Some(next.cursor), false);
        assert!(names(&quiet.since).is_empty() && matches!(quiet.since, Since::Pods(_)));
        for e in [watcher::Event::Init, watcher::Event::InitApply(pod("c", "ci", "6")), watcher::Event::InitDone] {
            store.apply(&e);
        }
        let relisted = store.read("ci", Some(quiet.cursor), false);
        assert!(matches!(relisted.since, Since::Everything(_)), "a relist replaced the store");
        assert_eq!(names(&relisted.since), vec![("c".into(), Some("6".into()))]);
    }

    #[test]
    fn a_reader_further_behind_than_the_log_starts_over() {
        let store = PodStore::default();
        store.apply(&watcher::Event::InitDone);
        let start = store.read("ci", None, false).cursor;
        for i in 0..=LOG_LIMIT {
            store.apply(&watcher::Event::Apply(pod(&format!("p{}", i % 3), "ci", "1")));
        }
        assert!(matches!(store.read("ci", Some(start), false).since, Since::Everything(_)));
    }

    #[test]
    fn a_namespace_left_empty_is_forgotten_and_readiness_waits_for_a_full_list() {
        use futures::FutureExt;
        let store = PodStore::default();
        store.apply(&watcher::Event::Init);
        store.apply(&watcher::Event::InitApply(pod("a", "ci", "1")));
        assert!(store.listed().now_or_never().is_none(), "not listed before the list is complete");
        assert!(store.namespace("ci").is_empty(), "a relist is swapped in whole");
        store.apply(&watcher::Event::InitDone);
        assert!(store.listed().now_or_never().is_some());
        store.apply(&watcher::Event::Apply(pod("b", "other", "2")));
        assert_eq!(store.get("other", "b").map(|p| id(&p).1), Some("2".into()));
        store.apply(&watcher::Event::Delete(pod("b", "other", "3")));
        assert!(store.get("other", "b").is_none());
        assert_eq!(store.inner.lock().unwrap().pods.len(), 1, "only ci is left");
        assert_eq!(store.namespace("ci").len(), 1);
    }

    /// A reader's view of one namespace: replays what each read gives it.
    #[derive(Default)]
    struct Replay {
        cursor: Option<Cursor>,
        pods: BTreeMap<String, String>,
    }

    impl Replay {
        fn take(&mut self, batch: Batch) {
            match batch.since {
                Since::Everything(pods) => self.pods = pods.iter().map(|p| id(p)).collect(),
                Since::Pods(changed) => {
                    for (name, pod) in changed {
                        match pod {
                            Some(p) => self.pods.insert(name.to_string(), id(&p).1),
                            None => self.pods.remove(name.as_str()),
                        };
                    }
                }
            }
            self.cursor = Some(batch.cursor);
        }
    }

    proptest::proptest! {
        /// After any sequence of watcher events over three namespaces (relists cut short, restarted, or
        /// with changes between their start and end included), the store holds what kube-runtime's
        /// reflector store holds, and a reader that replays what it is given holds the same.
        #[test]
        fn the_store_holds_what_the_reflector_holds(
            events in proptest::collection::vec((0u8..5, 0usize..3, 0u8..4, 0u16..1000), 1..80),
        ) {
            use kube::ResourceExt;
            let (reference, mut writer) = kube::runtime::reflector::store();
            let store = PodStore::default();
            let namespaces = ["a", "b", "c"];
            let mut readers: Vec<Replay> = namespaces.iter().map(|_| Replay::default()).collect();
            for (kind, ns, name, rv) in events {
                let p = k8s_pod(&format!("p{name}"), namespaces[ns], &rv.to_string());
                let event = match kind {
                    0 => watcher::Event::Init,
                    1 => watcher::Event::InitApply(p),
                    2 => watcher::Event::InitDone,
                    3 => watcher::Event::Apply(p),
                    _ => watcher::Event::Delete(p),
                };
                writer.apply_watcher_event(&event);
                store.apply(&cached(&event));
                for (ns, reader) in namespaces.iter().zip(&mut readers) {
                    let want: BTreeMap<String, String> = reference
                        .state()
                        .iter()
                        .filter(|p| p.namespace().as_deref() == Some(*ns))
                        .map(|p| (p.name_any(), p.resource_version().unwrap_or_default()))
                        .collect();
                    let got: BTreeMap<_, _> = store.namespace(ns).iter().map(|p| id(p)).collect();
                    proptest::prop_assert_eq!(&got, &want, "namespace {} after {:?}", ns, event);
                    reader.take(store.read(ns, reader.cursor, false));
                    proptest::prop_assert_eq!(&reader.pods, &want, "a reader of {}", ns);
                    for name in (0..4).map(|i| format!("p{i}")) {
                        let reference = reference.get(&kube::runtime::reflector::ObjectRef::new(&name).within(ns));
                        let got = store.get(ns, &name).map(|p| id(&p).1);
                        proptest::prop_assert_eq!(got, reference.map(|p| p.resource_version().unwrap_or_default()));
                    }
                }
            }
        }
    }
}
