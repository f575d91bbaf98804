//! The rendezvous join token, read from a Secret the controller watches: one watch per Secret a policy
//! names, scoped by `fieldSelector=metadata.name`, so RBAC limited to that name (`resourceNames`, list and
//! watch) still holds, and a poll costs no API request. A token rotated in its Secret is used from the next
//! read on. A watch that fails is never trusted again: the next read starts a new one and waits for its
//! list. A revoked grant is noticed when the watch is next renewed (every [`REWATCH_SECS`]).
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::api::{MeshPolicy, SecretKeyRef};
use crate::presence::FetchError;
use crate::telemetry::Metrics;

/// The Secret annotation that lists the rendezvous URLs its token may be sent to (comma or space
/// separated): whoever may edit a MeshPolicy must not be able to send a Secret they cannot read anywhere.
pub const ALLOWED_URLS_ANNOTATION: &str = "agentmesh.dev/rendezvous-urls";

/// A Secret's watch is renewed this often (seconds): an established watch outlives a revoked grant, and
/// only its renewal is refused, so this bounds how long a revoked token is still used.
const REWATCH_SECS: u32 = 10;

/// The watched Secrets, by (namespace, name).
pub struct Tokens {
    client: Client,
    metrics: Arc<Metrics>,
    watches: Mutex<HashMap<(String, String), Watch>>,
}

/// Where one Secret's watch stands.
#[derive(Clone, Debug, PartialEq)]
enum Listing {
    Pending,
    Listed,
    Failed(String),
}

struct Watch {
    store: Store<Secret>,
    state: watch::Receiver<Listing>,
    task: tokio::task::AbortHandle,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tokens {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self { client, metrics, watches: Mutex::default() }
    }

    /// The token `r` names in `namespace`, if its Secret exists, holds the key, and allows `url`. Waits at
    /// most `wait` for a new watch's first list.
    pub async fn token(
        &self,
        namespace: &str,
        r: &SecretKeyRef,
        url: &str,
        wait: Duration,
    ) -> Result<String, FetchError> {
        let (store, mut state) = self.watch(namespace, &r.name);
        let listing = match tokio::time::timeout(wait, state.wait_for(|s| *s != Listing::Pending)).await {
            Err(_) => Listing::Failed("no answer yet".into()),
            Ok(Err(_)) => Listing::Failed("its watch was stopped".into()),
            Ok(Ok(s)) => (*s).clone(),
        };
        if let Listing::Failed(why) = listing {
            return Err(FetchError::Token(format!("Secret {:?} could not be listed: {why}", r.name)));
        }
        let secret = store.get(&ObjectRef::new(&r.name).within(namespace));
        let secret = secret.ok_or_else(|| FetchError::Token(format!("Secret {:?} not found", r.name)))?;
        token_in(&secret, r, url)
    }

    /// Stops the watches of Secrets no policy in `policies` still names (a policy being deleted no longer
    /// does).
    pub fn retain(&self, policies: &[Arc<MeshPolicy>]) {
        let named: HashSet<(String, String)> = policies
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| Some((p.namespace()?, p.spec.rendezvous.join_token_secret_ref.as_ref()?.name.clone())))
            .collect();
        self.watches.lock().expect("token watches").retain(|key, _| named.contains(key));
    }

    /// The watch of Secret `name`, started anew when there is none or the last one failed.
    fn watch(&self, namespace: &str, name: &str) -> (Store<Secret>, watch::Receiver<Listing>) {
        let mut watches = self.watches.lock().expect("token watches");
        let key = (namespace.to_owned(), name.to_owned());
        if watches.get(&key).is_none_or(|w| matches!(*w.state.borrow(), Listing::Failed(_))) {
            watches.insert(key.clone(), self.start(namespace, name));
        }
        let w = &watches[&key];
        (w.store.clone(), w.state.clone())
    }

    fn start(&self, namespace: &str, name: &str) -> Watch {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let config = watcher::Config::default().timeout(REWATCH_SECS).fields(&format!("metadata.name={name}"));
        let (store, writer) = reflector::store();
        let (state_tx, state) = watch::channel(Listing::Pending);
        let metrics = self.metrics.clone();
        // The first error ends the watch (no retries here): the next read starts a new one.
        let task = async move {
            let mut events = std::pin::pin!(watcher(api, config).reflect(writer));
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => drop(state_tx.send_replace(Listing::Listed)),
                    Ok(_) => {}
                    Err(e) => {
                        metrics.watch_failed("secrets", &e);
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
fn token_in(secret: &Secret, r: &SecretKeyRef, url: &str) -> Result<String, FetchError> {
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
        let r = SecretKeyRef { name: "t".into(), key: "k".into() };
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
