//! Validate: the MeshPolicy as every later step reads it. What the CRD schema already enforces is checked
//! again, so an object written before a schema change, or past a disabled validation, cannot make the
//! controller act on nonsense. Also the one home of the rule that settles which policy owns a Pod two
//! policies select.
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::api::{KeyRef, MeshPolicy, Mode};
use crate::{duration, planner};

/// The longest `spec.unreachableBackoff` (doubled up to 64 times, it stays well within any clock).
pub const MAX_UNREACHABLE_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// A MeshPolicy that passed validation, in the units the controller uses.
#[derive(Clone, Debug)]
pub struct ValidPolicy {
    pub name: String,
    pub namespace: String,
    /// Also the planner's seed: each policy's mesh is its own.
    pub uid: String,
    pub mode: Mode,
    pub max_peers: u32,
    pub selector: Selector,
    pub node_id_annotation: String,
    pub topology_key: Option<String>,
    pub heartbeat_timeout: Duration,
    /// See `spec.unreachableBackoff`.
    pub unreachable_backoff: Duration,
    pub rendezvous: Rendezvous,
    owner_key: OwnerKey,
}

/// Where and how presence is read.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// The base URL without a trailing '/': what a join-token Secret must allow.
    pub base_url: String,
    pub presence_url: String,
    pub poll_interval: Duration,
    pub timeout: Duration,
    pub ca: Option<Ca>,
    pub join_token: Option<KeyRef>,
}

/// Where the CAs that sign the rendezvous' certificate come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ca {
    /// `caBundle`, decoded and checked to hold PEM certificates.
    Pem(String),
    /// `caConfigMapRef`: read at each presence read.
    ConfigMap(KeyRef),
}

/// A spec field the controller refuses, naming the field and its value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("spec.{field}: {value} {problem}")]
pub struct Invalid {
    pub field: &'static str,
    /// As written in the spec: a string quoted, a number as is.
    pub value: String,
    pub problem: String,
}

fn invalid(field: &'static str, value: impl std::fmt::Debug, problem: impl Into<String>) -> Invalid {
    Invalid { field, value: format!("{value:?}"), problem: problem.into() }
}

impl ValidPolicy {
    pub fn new(policy: &MeshPolicy) -> Result<Self, Invalid> {
        let spec = &policy.spec;
        let dur = |field: &'static str, v: &str| {
            duration::parse(v).map_err(|_| invalid(field, v, "is not a duration such as \"10s\" or \"500ms\""))
        };
        let at_least_a_second = |field: &'static str, v: &str| {
            Some(dur(field, v)?)
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| invalid(field, v, "is below 1s"))
        };
        let poll_interval = at_least_a_second("rendezvous.pollInterval", &spec.rendezvous.poll_interval)?;
        if spec.max_peers > planner::MAX_CAP {
            return Err(invalid("maxPeers", spec.max_peers, format!("exceeds {}", planner::MAX_CAP)));
        }
        let selector = Selector::try_from(spec.selector.clone())
            .map_err(|e| invalid("selector", &spec.selector, format!("is not a selector: {e}")))?;
        Ok(Self {
            name: policy.name_any(),
            namespace: policy.namespace().unwrap_or_default(),
            uid: policy.uid().unwrap_or_default(),
            mode: spec.mode,
            max_peers: spec.max_peers,
            selector,
            node_id_annotation: spec.identity.node_id_annotation.clone(),
            topology_key: spec.topology_key.clone(),
            heartbeat_timeout: dur("heartbeatTimeout", &spec.heartbeat_timeout)?,
            unreachable_backoff: Some(at_least_a_second("unreachableBackoff", &spec.unreachable_backoff)?)
                .filter(|d| *d <= MAX_UNREACHABLE_BACKOFF)
                .ok_or_else(|| invalid("unreachableBackoff", &spec.unreachable_backoff, "exceeds 24h"))?,
            rendezvous: Rendezvous::new(
                &spec.rendezvous,
                poll_interval,
                dur("rendezvous.timeout", &spec.rendezvous.timeout)?,
            )?,
            owner_key: owner_key(policy),
        })
    }

    /// Whether the policy's selector chooses a Pod with these labels (the namespace is the caller's).
    pub fn selects(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }

    /// The selectors of the policy's older peers in its namespace: the older policy owns a Pod both select,
    /// so only these can take one from it.
    pub fn older_selectors(&self, policies: &[Arc<MeshPolicy>]) -> Vec<Selector> {
        policies
            .iter()
            .filter(|p| {
                p.namespace().as_deref() == Some(self.namespace.as_str()) && p.uid().as_deref() != Some(&self.uid)
            })
            .filter(|p| owner_key(p) < self.owner_key)
            .filter_map(|p| Selector::try_from(p.spec.selector.clone()).ok())
            .collect()
    }
}

impl Rendezvous {
    fn new(spec: &crate::api::Rendezvous, poll_interval: Duration, timeout: Duration) -> Result<Self, Invalid> {
        let base = url::Url::parse(&spec.url)
            .map_err(|e| invalid("rendezvous.url", &spec.url, format!("is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("rendezvous.url", &spec.url, "is not http:// or https://"));
        }
        // The join token goes to base URL + path: a path that does not start with '/' could change the host.
        if !spec.presence_path.starts_with('/') {
            return Err(invalid("rendezvous.presencePath", &spec.presence_path, "must start with '/'"));
        }
        let base_url = spec.url.trim_end_matches('/').to_owned();
        let ca = match (&spec.ca_bundle, &spec.ca_config_map_ref) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "rendezvous.caConfigMapRef",
                    "",
                    "and spec.rendezvous.caBundle: set one, not both",
                ));
            }
            (Some(bytes), None) => Some(Ca::Pem(pem(bytes)?)),
            (None, Some(r)) => Some(Ca::ConfigMap(r.clone())),
            (None, None) => None,
        };
        Ok(Self {
            presence_url: format!("{base_url}{}", spec.presence_path),
            base_url,
            poll_interval,
            timeout,
            ca,
            join_token: spec.join_token_secret_ref.clone(),
        })
    }
}

/// `caBundle`'s PEM text: base64 in the spec (the API server decodes it), and it must hold a certificate.
fn pem(bytes: &k8s_openapi::ByteString) -> Result<String, Invalid> {
    let shown = || format!("({} bytes)", bytes.0.len());
    let text = std::str::from_utf8(&bytes.0).map_err(|_| Invalid {
        field: "rendezvous.caBundle",
        value: shown(),
        problem: "is not PEM text once decoded".into(),
    })?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        let problem = "holds no PEM certificate once decoded (base64 of the PEM file, as `base64 -w0 ca.crt` prints)";
        return Err(Invalid { field: "rendezvous.caBundle", value: shown(), problem: problem.into() });
    }
    Ok(text.to_owned())
}

/// The older policy owns a Pod two policies select: creation time, then name, decide.
type OwnerKey = (Option<Timestamp>, String);

fn owner_key(p: &MeshPolicy) -> OwnerKey {
    (p.metadata.creation_timestamp.as_ref().map(|t| t.0), p.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: serde_json::Value) -> MeshPolicy {
        let mut full =
            serde_json::json!({"selector": {"matchLabels": {"app": "agent"}}, "rendezvous": {"url": "http://rv:8080"}});
        merge(&mut full, spec);
        let mut p = MeshPolicy::new("mesh", serde_json::from_value(full).expect("a spec"));
        p.metadata.namespace = Some("ci".into());
        p
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    #[test]
    fn each_refused_field_is_named_with_its_value() {
        let cases = [
            (r#"{"rendezvous": {"pollInterval": "soon"}}"#, "spec.rendezvous.pollInterval: \"soon\" is not a duration"),
            (r#"{"rendezvous": {"pollInterval": "500ms"}}"#, "spec.rendezvous.pollInterval: \"500ms\" is below 1s"),
            (r#"{"rendezvous": {"timeout": "1x"}}"#, "spec.rendezvous.timeout: \"1x\" is not a duration"),
            (r#"{"heartbeatTimeout": "-1s"}"#, "spec.heartbeatTimeout: \"-1s\" is not a duration"),
            (r#"{"unreachableBackoff": "100ms"}"#, "spec.unreachableBackoff: \"100ms\" is below 1s"),
            (r#"{"unreachableBackoff": "25h"}"#, "spec.unreachableBackoff: \"25h\" exceeds 24h"),
            (r#"{"maxPeers": 65}"#, "spec.maxPeers: 65 exceeds 64"),
            (r#"{"rendezvous": {"url": "rv/presence"}}"#, "spec.rendezvous.url: \"rv/presence\" is not a URL"),
            (r#"{"rendezvous": {"url": "ftp://rv"}}"#, "spec.rendezvous.url: \"ftp://rv\" is not http:// or https://"),
            (
                r#"{"rendezvous": {"presencePath": "@evil/x"}}"#,
                "spec.rendezvous.presencePath: \"@evil/x\" must start with '/'",
            ),
            (r#"{"selector": {"matchExpressions": [{"key": "a", "operator": "Sometimes"}]}}"#, "spec.selector: "),
            // base64 of "not a cert", and of the bytes ff fe
            (
                r#"{"rendezvous": {"caBundle": "bm90IGEgY2VydA=="}}"#,
                "spec.rendezvous.caBundle: (10 bytes) holds no PEM",
            ),
            (r#"{"rendezvous": {"caBundle": "//4="}}"#, "spec.rendezvous.caBundle: (2 bytes) is not PEM text"),
            (
                r#"{"rendezvous": {"caBundle": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t", "caConfigMapRef": {"name": "a", "key": "b"}}}"#,
                "spec.rendezvous.caConfigMapRef: \"\" and spec.rendezvous.caBundle: set one, not both",
            ),
        ];
        for (spec, want) in cases {
            let err = ValidPolicy::new(&policy(serde_json::from_str(spec).unwrap())).expect_err(spec).to_string();
            assert!(err.starts_with(want), "{spec}: {err}");
        }
    }

    #[test]
    fn a_valid_spec_in_the_controllers_units() {
        let spec = r#"{"maxPeers": 6, "rendezvous": {"url": "https://rv/", "presencePath": "/p", "pollInterval": "1m30s",
                       "joinTokenSecretRef": {"name": "t", "key": "k"}}, "topologyKey": "zone"}"#;
        let p = ValidPolicy::new(&policy(serde_json::from_str(spec).unwrap())).expect("valid");
        assert_eq!((p.name.as_str(), p.namespace.as_str(), p.max_peers), ("mesh", "ci", 6));
        assert_eq!(p.rendezvous.base_url, "https://rv");
        assert_eq!(p.rendezvous.presence_url, "https://rv/p");
        assert_eq!(p.rendezvous.poll_interval, Duration::from_secs(90));
        assert_eq!(p.rendezvous.join_token.as_ref().map(|r| r.name.as_str()), Some("t"));
        assert_eq!(p.rendezvous.ca, None);
        // base64 of "-----BEGIN CERTIFICATE-----", as a Kubernetes caBundle holds PEM
        let inline = r#"{"rendezvous": {"caBundle": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t"}}"#;
        let q = ValidPolicy::new(&policy(serde_json::from_str(inline).unwrap())).expect("valid");
        assert_eq!(q.rendezvous.ca, Some(Ca::Pem("-----BEGIN CERTIFICATE-----".into())));
        // Wrapped as `base64 ca.crt` prints it: the API server takes it, and so does the controller.
        let wrapped = r#"{"rendezvous": {"caBundle": "LS0tLS1CRUdJTiBDRVJU\nSUZJQ0FURS0tLS0t\n"}}"#;
        let q = ValidPolicy::new(&policy(serde_json::from_str(wrapped).unwrap())).expect("valid");
        assert_eq!(q.rendezvous.ca, Some(Ca::Pem("-----BEGIN CERTIFICATE-----".into())));
        // Stored before caBundle was base64: PEM text still reads, and still works.
        let stored = r#"{"rendezvous": {"caBundle": "-----BEGIN CERTIFICATE-----"}}"#;
        let q = ValidPolicy::new(&policy(serde_json::from_str(stored).unwrap())).expect("valid");
        assert_eq!(q.rendezvous.ca, Some(Ca::Pem("-----BEGIN CERTIFICATE-----".into())));
        // Neither base64 nor PEM: the policy reads, and is refused on its own.
        let garbage = r#"{"rendezvous": {"caBundle": "%%%"}}"#;
        let err = ValidPolicy::new(&policy(serde_json::from_str(garbage).unwrap())).expect_err("refused");
        assert!(err.to_string().starts_with("spec.rendezvous.caBundle: (3 bytes) holds no PEM"), "{err}");
        let by_ref = r#"{"rendezvous": {"caConfigMapRef": {"name": "kube-root-ca.crt", "key": "ca.crt"}}}"#;
        let q = ValidPolicy::new(&policy(serde_json::from_str(by_ref).unwrap())).expect("valid");
        let want = KeyRef { name: "kube-root-ca.crt".into(), key: "ca.crt".into() };
        assert_eq!(q.rendezvous.ca, Some(Ca::ConfigMap(want)));
        assert_eq!(p.topology_key.as_deref(), Some("zone"));
        let labels = |v: &str| [("app".to_string(), v.to_string())].into();
        assert!(p.selects(&labels("agent")) && !p.selects(&labels("web")));
    }

    #[test]
    fn the_older_policy_owns_a_pod_both_select_and_the_name_breaks_ties() {
        let at = |name: &str, uid: &str, secs: i64| {
            let mut p = policy(serde_json::json!({}));
            p.metadata.name = Some(name.into());
            p.metadata.uid = Some(uid.into());
            p.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(secs).unwrap()));
            Arc::new(p)
        };
        let all = vec![at("old", "1", 10), at("b-same", "2", 20), at("c-same", "3", 20), at("new", "4", 30)];
        let older = |i: usize| ValidPolicy::new(&all[i]).unwrap().older_selectors(&all).len();
        assert_eq!([older(0), older(1), older(2), older(3)], [0, 1, 2, 3]);
        let mut elsewhere = (*all[0]).clone();
        elsewhere.metadata.namespace = Some("other".into());
        assert_eq!(ValidPolicy::new(&all[3]).unwrap().older_selectors(&[Arc::new(elsewhere)]).len(), 0);
    }
}
