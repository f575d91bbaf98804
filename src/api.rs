//! The MeshPolicy custom resource (`agentmesh.dev/v1alpha1`, docs/design.md §3.1). The CRD in `crds/` is generated
//! from these types; what the schema cannot say is written as CEL rules next to the field it concerns, so a
//! bad spec is rejected at admission with a message that names the field.
use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration;

pub const GROUP: &str = "agentmesh.dev";

/// The desired mesh: which Pods are its agents, how many links each may hold, and where their presence
/// is read.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "agentmesh.dev",
    version = "v1alpha1",
    kind = "MeshPolicy",
    plural = "meshpolicies",
    shortname = "mp",
    category = "agentmesh",
    namespaced,
    status = "MeshPolicyStatus",
    derive = "PartialEq",
    doc = "A mesh of supplementary sync links between the build agents a selector chooses: mesh-operator plans it from the agents' presence at the rendezvous, with at most spec.maxPeers links per agent, and writes each agent Pod's peers into its annotations.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Max-Peers","type":"integer","jsonPath":".spec.maxPeers"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.selected"}"#,
    printcolumn = r#"{"name":"Eligible","type":"integer","jsonPath":".status.eligible"}"#,
    printcolumn = r#"{"name":"Assigned","type":"integer","jsonPath":".status.assigned"}"#,
    printcolumn = r#"{"name":"Links","type":"integer","jsonPath":".status.links"}"#,
    printcolumn = r#"{"name":"Max-Degree","type":"integer","jsonPath":".status.maxDegree","priority":1}"#,
    printcolumn = r#"{"name":"Components","type":"integer","jsonPath":".status.components","priority":1}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.heartbeatTimeout) > duration(self.rendezvous.pollInterval)",
     "message": "spec.heartbeatTimeout must exceed spec.rendezvous.pollInterval, or every agent ages out between two polls",
     "fieldPath": ".heartbeatTimeout", "reason": "FieldValueInvalid"},
    {"rule": "duration(self.unreachableBackoff) >= duration('1s') && duration(self.unreachableBackoff) <= duration('24h')",
     "message": "spec.unreachableBackoff must be between 1s and 24h",
     "fieldPath": ".unreachableBackoff", "reason": "FieldValueInvalid"},
]))]
pub struct MeshPolicySpec {
    /// Chooses the agent Pods in this namespace. Must not be empty: an empty selector would claim every Pod.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
         "message": "spec.selector must have matchLabels or matchExpressions; an empty selector would select every Pod in the namespace"},
    ]))]
    pub selector: LabelSelector,
    /// The cap: supplementary links per agent, dialed plus accepted. 0 disables the mesh.
    // Its bound is the planner's; the annotations a plan becomes are defined in `crate::assignment`.
    #[serde(default = "default_max_peers")]
    #[schemars(range(min = 0, max = crate::planner::MAX_CAP))]
    pub max_peers: u32,
    /// Where the agents' presence is read: which agents are alive and where they accept links.
    pub rendezvous: Rendezvous,
    /// Presence older than this is not alive (Go duration).
    #[serde(default = "default_heartbeat_timeout")]
    #[schemars(length(max = 32), regex(pattern = duration::PATTERN))]
    pub heartbeat_timeout: String,
    /// How an agent Pod names its node id.
    #[serde(default)]
    pub identity: Identity,
    /// A label such as `topology.kubernetes.io/zone`; when set, links are spread across its values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 316), regex(pattern = LABEL_KEY_PATTERN))]
    pub topology_key: Option<String>,
    /// `Enforce` patches Pods; `Observe` plans and reports in status but patches nothing.
    #[serde(default)]
    pub mode: Mode,
    /// How long the plan avoids a pair of agents after one reports it cannot reach the other (Go
    /// duration, 1s to 24h). Doubled each time the pair fails again once back in the plan, up to 64
    /// times; forgotten after a quiet back-off.
    #[serde(default = "default_unreachable_backoff")]
    #[schemars(length(max = 32), regex(pattern = duration::PATTERN))]
    pub unreachable_backoff: String,
}

impl MeshPolicy {
    /// Whether this policy selects `pod`: same namespace, and the selector matches. An unusable selector
    /// selects nothing.
    pub fn selects(&self, pod: &impl kube::Resource) -> bool {
        use kube::ResourceExt;
        self.selects_labels(pod.namespace().as_deref(), pod.labels())
    }

    /// Whether this policy selects a Pod of namespace `ns` with `labels`.
    pub fn selects_labels(&self, ns: Option<&str>, labels: &std::collections::BTreeMap<String, String>) -> bool {
        use kube::ResourceExt;
        use kube::core::{Selector, SelectorExt};
        self.namespace().as_deref() == ns
            && Selector::try_from(self.spec.selector.clone()).is_ok_and(|s| s.matches(labels))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.timeout) <= duration(self.pollInterval)",
     "message": "spec.rendezvous.timeout must not exceed spec.rendezvous.pollInterval", "fieldPath": ".timeout"},
    {"rule": "duration(self.pollInterval) >= duration('1s')",
     "message": "spec.rendezvous.pollInterval must be at least 1s", "fieldPath": ".pollInterval"},
    {"rule": "duration(self.timeout) >= duration('100ms')",
     "message": "spec.rendezvous.timeout must be at least 100ms", "fieldPath": ".timeout"},
    {"rule": "!has(self.caBundle) || self.url.startsWith('https://')",
     "message": "spec.rendezvous.caBundle is only used with an https:// url", "fieldPath": ".caBundle"},
    {"rule": "!has(self.caConfigMapRef) || self.url.startsWith('https://')",
     "message": "spec.rendezvous.caConfigMapRef is only used with an https:// url", "fieldPath": ".caConfigMapRef"},
    {"rule": "!(has(self.caBundle) && has(self.caConfigMapRef))",
     "message": "spec.rendezvous.caBundle and spec.rendezvous.caConfigMapRef: set one, not both", "fieldPath": ".caConfigMapRef"},
]))]
pub struct Rendezvous {
    /// Base URL of the rendezvous service, `http://` or `https://`.
    #[schemars(length(min = 8, max = 2048), extend("x-kubernetes-validations" = [
        {"rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''",
         "message": "spec.rendezvous.url must be an absolute http:// or https:// URL with a host"},
    ]))]
    pub url: String,
    /// The presence endpoint's path under `url` (docs/presence-api.md).
    #[serde(default = "default_presence_path")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/[^\s?#]*$"))]
    pub presence_path: String,
    /// How often presence is read (Go duration, at least 1s). Reads are also made promptly while a Ready
    /// agent Pod has no presence entry yet.
    #[serde(default = "default_poll_interval")]
    #[schemars(length(max = 32), regex(pattern = duration::PATTERN))]
    pub poll_interval: String,
    /// How long one presence read may take (Go duration, 100ms to pollInterval); a slower one counts as an
    /// outage.
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 32), regex(pattern = duration::PATTERN))]
    pub timeout: String,
    /// Bearer token for the presence request, read from a Secret in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_secret_ref: Option<KeyRef>,
    /// The CAs that sign the rendezvous' certificate: PEM, base64-encoded as Kubernetes `caBundle` fields
    /// are. Without it (and without caConfigMapRef), the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "base64_or_pem")]
    #[schemars(with = "Option<String>", length(min = 1, max = 87384), extend("format" = "byte"))]
    pub ca_bundle: Option<ByteString>,
    /// The CAs that sign the rendezvous' certificate, as PEM under a key of a ConfigMap in the policy's
    /// namespace (such as `kube-root-ca.crt`, or a trust-manager bundle). A changed ConfigMap is used from
    /// the next read on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_ref: Option<KeyRef>,
}

/// `caBundle` as stored: base64, or PEM text in a policy stored before it was base64. Never an error: one
/// policy's bad value must not stop the controller from reading every policy; the controller refuses it
/// on that policy alone (`InvalidPolicy`).
fn base64_or_pem<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ByteString>, D::Error> {
    use base64::Engine;
    let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
    if text.trim_start().starts_with("-----BEGIN") {
        return Ok(Some(ByteString(text.into_bytes())));
    }
    // The API server's base64 (Go's) skips line breaks, so a wrapped `base64 ca.crt` is valid: as here.
    let compact: String = text.split_ascii_whitespace().collect();
    let decoded = base64::engine::general_purpose::STANDARD.decode(compact);
    Ok(Some(ByteString(decoded.unwrap_or_else(|_| text.into_bytes()))))
}

/// A key of a Secret or a ConfigMap in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct KeyRef {
    /// The object's name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// The key within its data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// How an agent Pod names its node id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The Pod annotation that carries the agent's node id (its presence `node_id`).
    #[serde(default = "default_node_id_annotation")]
    #[schemars(length(min = 1, max = 316), regex(pattern = LABEL_KEY_PATTERN))]
    pub node_id_annotation: String,
}

impl Default for Identity {
    fn default() -> Self {
        Self { node_id_annotation: default_node_id_annotation() }
    }
}

/// `Enforce` writes each agent Pod's assignment; `Observe` plans and reports in status but writes nothing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    #[default]
    Enforce,
    Observe,
}

/// A qualified name with an optional DNS-subdomain prefix, as Kubernetes label and annotation keys are.
const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

fn default_max_peers() -> u32 {
    4
}
fn default_heartbeat_timeout() -> String {
    "600s".into()
}
fn default_unreachable_backoff() -> String {
    "1m".into()
}
fn default_presence_path() -> String {
    "/presence".into()
}
fn default_poll_interval() -> String {
    "10s".into()
}
fn default_timeout() -> String {
    "5s".into()
}
/// The `format` values kube-apiserver knows (k8s.io/kube-openapi's format registry). Any other, such as the
/// `uint32` schemars gives a `u32`, makes creating or changing the CRD (helm install and upgrade) warn
/// `unrecognized format`; the `minimum: 0` that comes with it already says what "unsigned" meant.
const KUBERNETES_FORMATS: [&str; 29] = [
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
];

fn kubernetes_formats(schema: &mut schemars::Schema) {
    use schemars::transform::{RestrictFormats, Transform};
    let mut restrict = RestrictFormats::default();
    restrict.infer_from_meta_schema = false;
    restrict.allowed_formats = KUBERNETES_FORMATS.iter().map(|f| (*f).into()).collect();
    restrict.transform(schema);
}

fn default_node_id_annotation() -> String {
    crate::assignment::NODE_ID.into()
}

/// What the operator last planned and wrote for this policy, and why agents were left out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
pub struct MeshPolicyStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `RendezvousReachable`, `Degraded`, `Conflict`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pods the selector chooses.
    #[serde(default)]
    pub selected: u32,
    /// Selected Pods that are Ready and match fresh, alive presence.
    #[serde(default)]
    pub eligible: u32,
    /// Eligible agents holding a published assignment.
    #[serde(default)]
    pub assigned: u32,
    /// Links in the planned graph.
    #[serde(default)]
    pub links: u32,
    /// The most links any agent has in the planned graph (never above spec.maxPeers).
    #[serde(default)]
    pub max_degree: u32,
    /// The fewest links any agent has in the planned graph.
    #[serde(default)]
    pub min_degree: u32,
    /// Connected components of the planned graph.
    #[serde(default)]
    pub components: u32,
    /// A digest of the current plan: it changes when any agent's assignment does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
    /// When the plan last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_plan_time: Option<Time>,
    /// How many selected Pods are left out of the plan: `excluded` lists at most 100 of them.
    #[serde(default)]
    pub excluded_total: u32,
    /// Selected Pods left out of the plan and why (the first 100 by Pod name), for `kubectl mesh explain`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub excluded: Vec<ExcludedPod>,
    /// Pairs of agents the plan avoids because one reported it cannot reach the other (the first 20 by
    /// Pod name); `unusableLinksTotal` counts them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub unusable_links: Vec<UnusableLink>,
    /// How many pairs the plan avoids: `unusableLinks` lists at most 20 of them.
    #[serde(default)]
    pub unusable_links_total: u32,
}

/// A pair of agents the plan avoids.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnusableLink {
    /// The Pod of the agent that reported it.
    pub reported_by: String,
    /// The Pod of the peer it cannot reach.
    pub peer: String,
    /// How many times the pair failed after being planned again.
    pub failures: u32,
    /// When the plan may hold the pair again.
    pub retry_after: Time,
}

/// A selected Pod left out of the plan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ExcludedPod {
    /// The Pod's name.
    pub pod: String,
    /// Why it is not an agent in the plan.
    pub reason: String,
}

/// The CRD as YAML, exactly as checked in under `crds/meshpolicy.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&MeshPolicy::crd()).expect("a CRD always serializes");
    format!("# Generated by `mesh-operator crd` from src/api.rs. Do not edit.\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_matches_the_types() {
        let checked_in = include_str!("../crds/meshpolicy.yaml");
        assert!(
            checked_in == crd_yaml(),
            "crds/meshpolicy.yaml drifted from src/api.rs: run `cargo run -- crd > crds/meshpolicy.yaml`"
        );
    }

    #[test]
    fn every_format_in_the_crd_is_one_kubernetes_knows() {
        fn formats(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    out.extend(m.get("format").and_then(|f| f.as_str()).map(str::to_owned));
                    m.values().for_each(|v| formats(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| formats(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        formats(&serde_json::to_value(MeshPolicy::crd()).unwrap(), &mut found);
        assert!(found.contains(&"date-time".to_string()), "the walk reaches the schema: {found:?}");
        let unknown: Vec<&String> = found.iter().filter(|f| !KUBERNETES_FORMATS.contains(&f.as_str())).collect();
        assert!(unknown.is_empty(), "formats kube-apiserver warns about: {unknown:?}");
    }

    /// `kubectl explain` has something to say about every field the project defines (Kubernetes' own
    /// types, the label selector and the conditions, carry theirs).
    #[test]
    fn every_field_of_ours_has_a_description() {
        fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
            let Some(props) = v.get("properties").and_then(|p| p.as_object()) else { return };
            for (name, field) in props {
                let here = format!("{path}.{name}");
                let ours = !["metadata", "apiVersion", "kind", "selector", "conditions"].contains(&name.as_str());
                if ours && field.get("description").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
                    missing.push(here.clone());
                }
                walk(&here, field, missing);
                walk(&here, field.get("items").unwrap_or(&serde_json::Value::Null), missing);
            }
        }
        let crd = serde_json::to_value(MeshPolicy::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert!(!schema["description"].as_str().unwrap().starts_with("Auto-generated"), "{}", schema["description"]);
        let mut missing = Vec::new();
        walk("", schema, &mut missing);
        assert!(missing.is_empty(), "fields without a description: {missing:?}");
    }

    #[test]
    fn helm_chart_carries_the_same_crd() {
        assert!(
            include_str!("../deploy/helm/mesh-operator/files/crds/meshpolicy.yaml")
                == include_str!("../crds/meshpolicy.yaml"),
            "deploy/helm/mesh-operator/files/crds/meshpolicy.yaml differs from crds/meshpolicy.yaml: run `make crd`"
        );
    }

    #[test]
    fn minimal_spec_takes_the_documented_defaults() {
        let spec: MeshPolicySpec =
            serde_yaml::from_str("selector: {matchLabels: {app: agent}}\nrendezvous: {url: 'http://rv:8080'}\n")
                .unwrap();
        assert_eq!(spec.max_peers, 4);
        assert_eq!(spec.heartbeat_timeout, "600s");
        assert_eq!(spec.rendezvous.presence_path, "/presence");
        assert_eq!(spec.rendezvous.poll_interval, "10s");
        assert_eq!(spec.rendezvous.timeout, "5s");
        assert_eq!(spec.identity.node_id_annotation, crate::assignment::NODE_ID);
        assert_eq!(spec.mode, Mode::Enforce);
        assert_eq!(spec.topology_key, None);
    }
}
