//! The history checker (docs/design.md §3.4): it watches every Pod event of a namespace, in the order the API
//! server delivers them, and after each one recomputes every agent's links from what the Pods publish
//! (what each dials, who dials it, what it accepts). It records the first event after which an agent is
//! over the cap, a link is dialed from both ends, an agent dials or accepts itself, or a Pod's
//! `agentmesh.dev/links` disagrees with what it dials and accepts. Tests end with [`History::assert_clean`].
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use mesh_operator::assignment::{self, Assignment};

const NODE_ID: &str = "agentmesh.dev/node-id";

#[derive(Default)]
struct Replay {
    cap: usize,
    /// Pod → its annotations (only `agentmesh.dev/*`), as of the last event.
    pods: BTreeMap<String, BTreeMap<String, String>>,
    /// Pods listed since the watch (re)started, until its list is complete.
    relist: Option<BTreeMap<String, BTreeMap<String, String>>>,
    events: usize,
    first_violation: Option<String>,
}

impl Replay {
    fn take(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.relist = Some(BTreeMap::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(relist) = self.relist.as_mut() {
                    relist.insert(pod.name_any(), ours(&pod));
                }
                return;
            }
            watcher::Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.pods = relist;
                }
            }
            watcher::Event::Apply(pod) => {
                self.pods.insert(pod.name_any(), ours(&pod));
            }
            watcher::Event::Delete(pod) => {
                self.pods.remove(&pod.name_any());
            }
        }
        self.events += 1;
        if self.first_violation.is_none()
            && let Some(v) = self.violation()
        {
            self.first_violation = Some(format!("after event {}: {v}", self.events));
        }
    }

    fn violation(&self) -> Option<String> {
        let mut published = BTreeMap::new();
        for (pod, keys) in &self.pods {
            let Some(a) = Assignment::from_annotations(keys) else { continue };
            let links = keys.get(assignment::LINKS).map(String::as_str).unwrap_or("");
            if links != a.links().to_string() {
                return Some(format!("Pod {pod} says {links:?} links but dials and accepts {}", a.links()));
            }
            let id = keys.get(NODE_ID).cloned().unwrap_or_else(|| format!("pod:{pod}"));
            published.insert(id, a);
        }
        assignment::first_violation(&published, self.cap)
    }
}

fn ours(pod: &Pod) -> BTreeMap<String, String> {
    pod.annotations()
        .iter()
        .filter(|(k, _)| k.starts_with("agentmesh.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A running history checker over one namespace.
pub struct History {
    replay: Arc<Mutex<Replay>>,
    task: tokio::task::JoinHandle<()>,
}

impl History {
    /// Starts watching `ns` and returns once the initial list is in (so no later event is missed).
    pub async fn start(client: &Client, ns: &str, cap: usize) -> Self {
        let replay = Arc::new(Mutex::new(Replay { cap, ..Default::default() }));
        let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let sink = replay.clone();
        let task = tokio::spawn(async move {
            let mut listed = Some(listed_tx);
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                let Ok(event) = event else { continue };
                let done = matches!(event, watcher::Event::InitDone);
                sink.lock().unwrap().take(event);
                if done && let Some(tx) = listed.take() {
                    let _ = tx.send(());
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), listed_rx)
            .await
            .expect("the history checker's initial list within 60 s")
            .unwrap();
        Self { replay, task }
    }

    /// Events replayed so far.
    pub fn events(&self) -> usize {
        self.replay.lock().unwrap().events
    }

    /// Panics with the first violation, if any; returns how many events were replayed.
    pub fn assert_clean(&self) -> usize {
        let replay = self.replay.lock().unwrap();
        if let Some(v) = &replay.first_violation {
            panic!("safety violated ({} events replayed): {v}", replay.events);
        }
        replay.events
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, id: &str, peers: &[&str], accepts: &[&str]) -> Pod {
        let peers: Vec<_> = peers.iter().map(|p| json!({"nodeId": p, "url": format!("ws://{p}")})).collect();
        let links = peers.len() + accepts.len();
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": {
            "agentmesh.dev/node-id": id, "agentmesh.dev/policy": "p",
            "agentmesh.dev/peers": serde_json::to_string(&peers).unwrap(),
            "agentmesh.dev/accepts": serde_json::to_string(accepts).unwrap(),
            "agentmesh.dev/links": links.to_string()}}}))
        .unwrap()
    }

    #[test]
    fn the_checker_fails_at_the_first_bad_event() {
        let mut r = Replay { cap: 1, ..Default::default() };
        r.take(watcher::Event::Apply(pod("a", "A", &["B"], &[])));
        r.take(watcher::Event::Apply(pod("b", "B", &[], &["A"])));
        assert_eq!(r.first_violation, None);
        r.take(watcher::Event::Apply(pod("c", "C", &["B"], &[])));
        assert!(
            r.first_violation.as_deref().unwrap().starts_with("after event 3: B has 2 links"),
            "{:?}",
            r.first_violation
        );
        r.take(watcher::Event::Delete(pod("c", "C", &[], &[])));
        assert!(r.first_violation.as_deref().unwrap().contains("event 3"), "the first violation is kept");
    }
}
