//! Where an agent reads its assignment: the kubelet's downward-API annotations file, polled, or (with the
//! `kube` feature) a watch of the agent's own Pod. A reading that does not parse (missing, truncated,
//! half-written, inconsistent) keeps the last good assignment and is reported; it is never applied. Any
//! other source can feed the mesh the same way: a `watch` channel of [`Reading`]s.
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::assignment::Assignment;
use crate::downward;

/// The latest reading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// The last assignment that parsed (None: unassigned, or nothing read yet).
    pub assignment: Option<Assignment>,
    /// Why the latest reading was refused, if it was.
    pub error: Option<String>,
}

/// Parses one reading of the file.
pub fn read(text: &str) -> Result<Option<Assignment>, String> {
    let map = downward::parse(text).map_err(|e| e.to_string())?;
    Assignment::from_annotations_strict(&map).map_err(|e| e.to_string())
}

/// Polls `path` every `every` and publishes each change. The file is replaced atomically by the kubelet
/// (a symlink swap), so a plain read sees one version or the other; inotify on such swaps is fragile,
/// polling is not.
pub fn watch_file(path: PathBuf, every: Duration) -> watch::Receiver<Reading> {
    let (tx, rx) = watch::channel(Reading::default());
    tokio::spawn(async move {
        let mut last_text: Option<String> = None;
        loop {
            let text = read_bounded(&path).await;
            let changed = match (&text, &last_text) {
                (Ok(t), Some(l)) => t != l,
                _ => true,
            };
            if changed {
                let result = match &text {
                    Ok(t) => read(t),
                    Err(e) => Err(e.clone()),
                };
                publish(&tx, result);
                last_text = text.ok();
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    rx
}

/// A good reading replaces the assignment; a bad one only reports, keeping the last good assignment.
fn publish(tx: &watch::Sender<Reading>, result: Result<Option<Assignment>, String>) {
    tx.send_modify(|r| match result {
        Ok(a) => *r = Reading { assignment: a, error: None },
        Err(e) => r.error = Some(e),
    });
}

/// Watches the agent's own Pod (`get`, `list` and `watch` on `pods`, narrowed to its name by a field
/// selector): changes arrive within a second, not a kubelet sync period.
#[cfg(feature = "kube")]
pub fn watch_pod(client: kube::Client, namespace: &str, name: &str) -> watch::Receiver<Reading> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (tx, rx) = watch::channel(Reading::default());
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let name = name.to_string();
    tokio::spawn(async move {
        let mut pods = watcher(pods, config).default_backoff().applied_objects().boxed();
        while let Some(event) = pods.next().await {
            match event {
                Ok(pod) => {
                    let annotations = pod.metadata.annotations.unwrap_or_default();
                    publish(&tx, Assignment::from_annotations_strict(&annotations).map_err(|e| e.to_string()));
                }
                Err(e) => publish(&tx, Err(format!("watching Pod {name}: {e}"))),
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// The file's text, reading at most one byte past the size limit (so a huge file costs no memory).
async fn read_bounded(path: &std::path::Path) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(downward::MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > downward::MAX_FILE_BYTES {
        return Err(downward::FileError::TooLarge(bytes.len()).to_string());
    }
    String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::Peer;
    use std::collections::BTreeMap;

    fn file(a: &Assignment) -> String {
        let map: BTreeMap<String, String> = a.to_annotations().into_iter().map(|(k, v)| (k.into(), v)).collect();
        downward::render(&map)
    }

    #[tokio::test]
    async fn a_half_written_file_keeps_the_last_good_assignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("annotations");
        let good = Assignment::new(vec![Peer { node_id: "b".into(), url: "ws://x/".into() }], [], "p".into());
        std::fs::write(&path, file(&good)).unwrap();
        let mut rx = watch_file(path.clone(), Duration::from_millis(10));
        rx.wait_for(|r| r.assignment.is_some()).await.unwrap();
        let text = file(&good);
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        let r = rx.wait_for(|r| r.error.is_some()).await.unwrap().clone();
        assert_eq!(r.assignment, Some(good), "{r:?}");
        std::fs::write(&path, "other=\"1\"").unwrap();
        let r = rx.wait_for(|r| r.error.is_none()).await.unwrap().clone();
        assert_eq!(r.assignment, None, "no agentmesh keys: unassigned");
    }
}
