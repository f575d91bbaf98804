//! The rendezvous join token, read from a Secret the controller watches: one watch per Secret a policy
//! names, scoped by `fieldSelector=metadata.name`, so RBAC limited to that name (`resourceNames`, list and
//! watch) still holds, and a poll costs no API request. A token rotated in its Secret is used from the next
//! read on.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::api::{MeshPolicy, SecretKeyRef};
use crate::presence::FetchError;

/// The Secret annotation that lists the rendezvous URLs its token may be sent to (comma or space
/// separated): whoever may edit a MeshPolicy must not be able to send a Secret they cannot read anywhere.
pub const ALLOWED_URLS_ANNOTATION: &str = "agentmesh.dev/rendezvous-urls";

/// The watched Secrets, by (namespace, name).
pub struct Tokens {
    client: Client,
    watches: Mutex<HashMap<(String, String), Watch>>,
}

struct Watch {
    store: Store<Secret>,
    listed: tokio::sync::watch::Receiver<bool>,
    /// The watch's last error, until a list succeeds: why a token is not there yet.
    error: Arc<Mutex<Option<String>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tokens {
    pub fn new(client: Client) -> Self {
        Self { client, watches: Mutex::default() }
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
        let (store, mut listed, error) = self.watch(namespace, &r.name);
        if tokio::time::timeout(wait, listed.wait_for(|l| *l)).await.is_err() {
            let why = error.lock().expect("token watch error").clone().unwrap_or_else(|| "no answer yet".into());
            return Err(FetchError::Token(format!("Secret {:?} could not be listed: {why}", r.name)));
        }
        let secret = store.get(&ObjectRef::new(&r.name).within(namespace));
        let secret = secret.ok_or_else(|| FetchError::Token(format!("Secret {:?} not found", r.name)))?;
        token_in(&secret, r, url)
    }

    /// Stops the watches of Secrets no policy in `policies` names any more.
    pub fn retain(&self, policies: &[Arc<MeshPolicy>]) {
        let named: HashSet<(String, String)> = policies
            .iter()
            .filter_map(|p| Some((p.namespace()?, p.spec.rendezvous.join_token_secret_ref.as_ref()?.name.clone())))
            .collect();
        self.watches.lock().expect("token watches").retain(|key, _| named.contains(key));
    }

    fn watch(
        &self,
        namespace: &str,
        name: &str,
    ) -> (Store<Secret>, tokio::sync::watch::Receiver<bool>, Arc<Mutex<Option<String>>>) {
        let mut watches = self.watches.lock().expect("token watches");
        let w = watches.entry((namespace.to_owned(), name.to_owned())).or_insert_with(|| self.start(namespace, name));
        (w.store.clone(), w.listed.clone(), w.error.clone())
    }

    fn start(&self, namespace: &str, name: &str) -> Watch {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let config = super::watch_config().fields(&format!("metadata.name={name}"));
        let (store, writer) = reflector::store();
        let (listed_tx, listed) = tokio::sync::watch::channel(false);
        let error: Arc<Mutex<Option<String>>> = Arc::default();
        let failed = error.clone();
        let stream = watcher(api, config).default_backoff().reflect(writer).for_each(move |event| {
            match event {
                Ok(watcher::Event::InitDone) => {
                    *failed.lock().expect("token watch error") = None;
                    listed_tx.send_replace(true);
                }
                Err(e) => *failed.lock().expect("token watch error") = Some(e.to_string()),
                Ok(_) => {}
            }
            std::future::ready(())
        });
        Watch { store, listed, error, task: tokio::spawn(stream).abort_handle() }
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
