//! What a policy names in its namespace besides Pods: the Secret holding the rendezvous join token and the
//! ConfigMap holding the rendezvous' CAs. Each is read from a watch of that one object, scoped by
//! `fieldSelector=metadata.name`, so RBAC limited to that name (`resourceNames`, list and watch) still
//! holds, and a poll costs no API request. A rotated token or CA bundle is used from the next read on. A
//! watch that fails is never trusted again: the next read starts a new one and waits for its list. A revoked
//! grant is noticed when the watch is next renewed (every [`REWATCH_SECS`]).
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::api::{KeyRef, MeshPolicy};
use crate::presence::FetchError;
use crate::telemetry::Metrics;

/// The Secret annotation that lists the rendezvous URLs its token may be sent to (comma or space
/// separated): whoever may edit a MeshPolicy must not be able to send a Secret they cannot read anywhere.
pub const ALLOWED_URLS_ANNOTATION: &str = "agentmesh.dev/rendezvous-urls";

/// A watch is renewed this often (seconds): an established watch outlives a revoked grant, and only its
/// renewal is refused, so this bounds how long a revoked token is still used.
const REWATCH_SECS: u32 = 10;

/// The watched join-token Secrets and CA ConfigMaps.
pub struct References {
    secrets: Watches<Secret>,
    config_maps: Watches<ConfigMap>,
}

impl References {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            secrets: Watches::new(client.clone(), metrics.clone(), "secrets"),
            config_maps: Watches::new(client, metrics, "configmaps"),
        }
    }

    /// The token `r` names in `namespace`, if its Secret exists, holds the key, and allows `url`. Waits at
    /// most `wait` for a new watch's first list.
    pub async fn token(&self, namespace: &str, r: &KeyRef, url: &str, wait: Duration) -> Result<String, FetchError> {
        let found = self.secrets.get(namespace, &r.name, wait).await.map_err(FetchError::Token)?;
        token_in(&found, r, url)
    }

    /// The PEM CAs `r` names in `namespace`, if its ConfigMap exists and holds the key.
    pub async fn ca_bundle(&self, namespace: &str, r: &KeyRef, wait: Duration) -> Result<String, FetchError> {
        let found = self.config_maps.get(namespace, &r.name, wait).await.map_err(FetchError::Ca)?;
        let pem = found.data.as_ref().and_then(|d| d.get(&r.key));
        pem.cloned().ok_or_else(|| FetchError::Ca(format!("ConfigMap {:?} has no key {:?}", r.name, r.key)))
    }

    /// Stops the watches no policy in `policies` still names (a policy being deleted no longer does).
    pub fn retain(&self, policies: &[Arc<MeshPolicy>]) {
        let live = || policies.iter().filter(|p| p.metadata.deletion_timestamp.is_none());
        let named = |pick: fn(&MeshPolicy) -> Option<&KeyRef>| -> HashSet<(String, String)> {
            live().filter_map(|p| Some((p.namespace()?, pick(p)?.name.clone()))).collect()
        };
        self.secrets.retain(&named(|p| p.spec.rendezvous.join_token_secret_ref.as_ref()));
        self.config_maps.retain(&named(|p| p.spec.rendezvous.ca_config_map_ref.as_ref()));
    }
}

/// Watches of single objects of one kind, by (namespace, name).
struct Watches<K: Watchable> {
    client: Client,
    metrics: Arc<Metrics>,
    /// The `watch` label of `mesh_operator_watch_errors_total`.
    label: &'static str,
    watches: Mutex<HashMap<(String, String), Watch<K>>>,
}

/// Where one object's watch stands.
#[derive(Clone, Debug, PartialEq)]
enum Listing {
    Pending,
    Listed,
    Failed(String),
}

struct Watch<K: Watchable> {
    store: Store<K>,
    state: watch::Receiver<Listing>,
    task: tokio::task::AbortHandle,
}

impl<K: Watchable> Drop for Watch<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A kind whose objects are watched one by one: a namespaced built-in such as Secret or ConfigMap.
trait Watchable:
    kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watchable for K where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

impl<K: Watchable> Watches<K> {
    fn new(client: Client, metrics: Arc<Metrics>, label: &'static str) -> Self {
        Self { client, metrics, label, watches: Mutex::default() }
    }

    /// Object `name` in `namespace`, once its watch has listed (at most `wait` for a new watch); why not.
    async fn get(&self, namespace: &str, name: &str, wait: Duration) -> Result<Arc<K>, String> {
        let kind = K::kind(&());
        let (store, mut state) = self.watch(namespace, name);
        let listing = match tokio::time::timeout(wait, state.wait_for(|s| *s != Listing::Pending)).await {
            Err(_) => Listing::Failed("no answer yet".into()),
            Ok(Err(_)) => Listing::Failed("its watch was stopped".into()),
            Ok(Ok(s)) => (*s).clone(),
        };
        if let Listing::Failed(why) = listing {
            return Err(format!("{kind} {name:?} could not be listed: {why}"));
        }
        store.get(&ObjectRef::new(name).within(namespace)).ok_or_else(|| format!("{kind} {name:?} not found"))
    }

    fn retain(&self, named: &HashSet<(String, String)>) {
        self.watches.lock().expect("object watches").retain(|key, _| named.contains(key));
    }

    /// The watch of object `name`, started anew when there is none or the last one failed.
    fn watch(&self, namespace: &str, name: &str) -> (Store<K>, watch::Receiver<Listing>) {
        let mut watches = self.watches.lock().expect("object watches");
        let key = (namespace.to_owned(), name.to_owned());
        if watches.get(&key).is_none_or(|w| matches!(*w.state.borrow(), Listing::Failed(_))) {
            watches.insert(key.clone(), self.start(namespace, name));
        }
        let w = &watches[&key];
        (w.store.clone(), w.state.clone())
    }

    fn start(&self, namespace: &str, name: &str) -> Watch<K> {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let config = watcher::Config::default().timeout(REWATCH_SECS).fields(&format!("metadata.name={name}"));
        let (store, writer) = reflector::store();
        let (state_tx, state) = watch::channel(Listing::Pending);
        let (metrics, label) = (self.metrics.clone(), self.label);
        // The first error ends the watch (no retries here): the next read starts a new one.
        let task = async move {
            let mut events = std::pin::pin!(watcher(api, config).reflect(writer));
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => drop(state_tx.send_replace(Listing::Listed)),
                    Ok(_) => {}
                    Err(e) => {
                        metrics.watch_failed(label, &e);
                        state_tx.send_replace(Listing::Failed(e.to_string()));
                        return;
                    }
                }
            }
        };
        Watch { store, state, task: tokio::spawn(task).abort_handle() }
    }
}

/// The token `r` names in `secret`, if the Secret allows `url` (see [`ALLOWED_URLS_ANNOTATION`]).
fn token_in(secret: &Secret, r: &KeyRef, url: &str) -> Result<String, FetchError> {
    let name = &r.name;
    let allowed = secret.annotations().get(ALLOWED_URLS_ANNOTATION).is_some_and(|list| {
        list.split([',', ' ', '\n']).map(|u| u.trim().trim_end_matches('/')).any(|u| !u.is_empty() && u == url)
    });
    if !allowed {
        return Err(FetchError::Token(format!(
            "Secret {name:?} does not allow its token to be sent to {url:?}: list that URL in its annotation {ALLOWED_URLS_ANNOTATION}"
        )));
    }
    let bytes = secret.data.as_ref().and_then(|d| d.get(&r.key));
    let bytes = bytes.ok_or_else(|| FetchError::Token(format!("Secret {name:?} has no key {:?}", r.key)))?;
    std::str::from_utf8(&bytes.0)
        .map(|t| t.trim().to_owned())
        .map_err(|_| FetchError::Token(format!("Secret {name:?} key {:?} is not UTF-8", r.key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(allowed: Option<&str>, data: serde_json::Value) -> Secret {
        let annotations = allowed.map(|a| serde_json::json!({ALLOWED_URLS_ANNOTATION: a})).unwrap_or_default();
        serde_json::from_value(serde_json::json!({"metadata": {"name": "t", "annotations": annotations}, "data": data}))
            .unwrap()
    }

    #[test]
    fn the_token_goes_only_to_a_url_its_secret_lists() {
        let r = KeyRef { name: "t".into(), key: "k".into() };
        let token = serde_json::json!({"k": "IGpvaW4K"}); // " join\n"
        let cases = [
            (Some("https://a, https://rv/"), token.clone(), Ok("join".to_string())),
            (Some("https://rv2\nhttps://rv"), token.clone(), Ok("join".to_string())),
            (Some("https://rv.elsewhere"), token.clone(), Err("does not allow its token to be sent to \"https://rv\"")),
            (None, token.clone(), Err("list that URL in its annotation agentmesh.dev/rendezvous-urls")),
            (Some("https://rv"), serde_json::json!({"other": "eA=="}), Err("has no key \"k\"")),
            (Some("https://rv"), serde_json::json!({"k": "/w=="}), Err("key \"k\" is not UTF-8")),
        ];
        for (allowed, data, want) in cases {
            let got = token_in(&secret(allowed, data), &r, "https://rv").map_err(|e| e.to_string());
            match (&got, &want) {
                (Ok(t), Ok(w)) => assert_eq!(t, w),
                (Err(e), Err(w)) => assert!(e.contains(w), "{e}"),
                _ => panic!("{allowed:?}: {got:?}, want {want:?}"),
            }
        }
    }
}
