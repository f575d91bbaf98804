//! Which Pods changed since a reader last looked. Every Pod event reaches the store through
//! [`Changes::apply`], which updates the store and records the Pod in one step under one lock; a reader
//! takes the Pods changed since its cursor, with their cached state, under the same lock. So a reader
//! never sees a store change without its record, or a record without its change, and replaying what it
//! is given keeps its own view equal to the store's. A relist replaces the store whole: every reader
//! starts over, as it does when its cursor fell behind the bounded log.
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::watcher;

use super::pods::CachedPod;

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
    Pods(Vec<(String, Option<Arc<CachedPod>>)>),
}

/// One read: what changed, the cursor to read from next, and (when asked for, to check an incremental
/// view against a full one) every Pod of the namespace as of the same instant.
pub struct Batch {
    pub since: Since,
    pub cursor: Cursor,
    pub all: Option<Vec<Arc<CachedPod>>>,
}

#[derive(Default)]
pub struct Changes(Mutex<Log>);

#[derive(Default)]
struct Log {
    /// Bumped by every relist: cursors from an earlier epoch start over.
    epoch: u64,
    /// The sequence number of the next record.
    seq: u64,
    /// The last [`LOG_LIMIT`] records: (namespace, Pod name), the oldest at `seq - records.len()`. A
    /// record shares its namespace with the one before when they match: a full log of copies would weigh
    /// megabytes.
    records: VecDeque<(Arc<str>, Box<str>)>,
}

impl Changes {
    /// Applies `event` to the store and records the Pod it changed, as one step.
    pub fn apply(&self, writer: &mut Writer<CachedPod>, event: &watcher::Event<CachedPod>) {
        let mut log = self.0.lock().expect("changes lock");
        writer.apply_watcher_event(event);
        match event {
            watcher::Event::Apply(pod) | watcher::Event::Delete(pod) => {
                if log.records.len() == LOG_LIMIT {
                    log.records.pop_front();
                }
                let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
                let ns = match log.records.back() {
                    Some((last, _)) if **last == *ns => Arc::clone(last),
                    _ => Arc::from(ns),
                };
                log.records.push_back((ns, pod.name_any().into_boxed_str()));
                log.seq += 1;
            }
            watcher::Event::InitDone => {
                log.epoch += 1;
                log.records.clear();
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// What changed in `ns` since `cursor` (everything, without one), read from `store`; with `all`, also
    /// every Pod of `ns` at the same instant.
    pub fn read(&self, store: &Store<CachedPod>, ns: &str, cursor: Option<Cursor>, all: bool) -> Batch {
        let log = self.0.lock().expect("changes lock");
        let now = Cursor { epoch: log.epoch, seq: log.seq };
        let everything = || store.state().into_iter().filter(|p| p.namespace().as_deref() == Some(ns)).collect();
        let oldest = log.seq - log.records.len() as u64;
        let since = match cursor {
            Some(c) if c.epoch == log.epoch && c.seq >= oldest => {
                let skip = (c.seq - oldest) as usize;
                let names: BTreeSet<&str> =
                    log.records.iter().skip(skip).filter(|(n, _)| **n == *ns).map(|(_, name)| &**name).collect();
                let get = |name: &str| store.get(&ObjectRef::new(name).within(ns));
                Since::Pods(names.into_iter().map(|name| (name.to_owned(), get(name))).collect())
            }
            _ => Since::Everything(everything()),
        };
        Batch { since, cursor: now, all: all.then(everything) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ns: &str, rv: &str) -> CachedPod {
        let pod = serde_json::json!({"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}});
        CachedPod::from_pod(serde_json::from_value(pod).unwrap())
    }

    fn names(since: &Since) -> Vec<(String, Option<String>)> {
        match since {
            Since::Everything(pods) => {
                let mut v: Vec<_> = pods.iter().map(|p| (p.name_any(), p.resource_version())).collect();
                v.sort();
                v
            }
            Since::Pods(pods) => {
                pods.iter().map(|(n, p)| (n.clone(), p.as_ref().and_then(|p| p.resource_version()))).collect()
            }
        }
    }

    #[test]
    fn a_reader_gets_each_changed_pod_once_as_cached_now_and_starts_over_after_a_relist() {
        let (store, mut writer) = kube::runtime::reflector::store::<CachedPod>();
        let changes = Changes::default();
        for e in [watcher::Event::Init, watcher::Event::InitApply(pod("a", "ci", "1")), watcher::Event::InitDone] {
            changes.apply(&mut writer, &e);
        }
        let first = changes.read(&store, "ci", None, false);
        assert_eq!(names(&first.since), vec![("a".into(), Some("1".into()))], "no cursor: everything");
        changes.apply(&mut writer, &watcher::Event::Apply(pod("b", "ci", "2")));
        changes.apply(&mut writer, &watcher::Event::Apply(pod("b", "ci", "3")));
        changes.apply(&mut writer, &watcher::Event::Apply(pod("x", "other", "4")));
        changes.apply(&mut writer, &watcher::Event::Delete(pod("a", "ci", "5")));
        let next = changes.read(&store, "ci", Some(first.cursor), true);
        assert_eq!(names(&next.since), vec![("a".into(), None), ("b".into(), Some("3".into()))]);
        assert_eq!(next.all.as_ref().map(Vec::len), Some(1), "b alone is left in ci");
        let quiet = changes.read(&store, "ci", Some(next.cursor), false);
        assert!(names(&quiet.since).is_empty() && matches!(quiet.since, Since::Pods(_)));
        for e in [watcher::Event::Init, watcher::Event::InitApply(pod("c", "ci", "6")), watcher::Event::InitDone] {
            changes.apply(&mut writer, &e);
        }
        let relisted = changes.read(&store, "ci", Some(quiet.cursor), false);
        assert!(matches!(relisted.since, Since::Everything(_)), "a relist replaced the store");
        assert_eq!(names(&relisted.since), vec![("c".into(), Some("6".into()))]);
    }

    #[test]
    fn a_reader_further_behind_than_the_log_starts_over() {
        let (store, mut writer) = kube::runtime::reflector::store::<CachedPod>();
        let changes = Changes::default();
        changes.apply(&mut writer, &watcher::Event::InitDone);
        let start = changes.read(&store, "ci", None, false).cursor;
        for i in 0..=LOG_LIMIT {
            changes.apply(&mut writer, &watcher::Event::Apply(pod(&format!("p{}", i % 3), "ci", "1")));
        }
        assert!(matches!(changes.read(&store, "ci", Some(start), false).since, Since::Everything(_)));
    }
}
