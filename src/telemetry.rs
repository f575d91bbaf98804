//! Logs (tracing, text or JSON), Prometheus metrics, and the `/metrics`, `/healthz`, `/readyz` endpoints.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabel {
    pub watch: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub namespace: String,
    pub policy: String,
}

impl PolicyLabel {
    pub fn new(namespace: &str, policy: &str) -> Self {
        Self { namespace: namespace.to_owned(), policy: policy.to_owned() }
    }

    pub fn of(policy: &crate::api::MeshPolicy) -> Self {
        use kube::ResourceExt;
        Self { namespace: policy.namespace().unwrap_or_default(), policy: policy.name_any() }
    }

    /// This policy's series of `result`.
    pub fn with(&self, result: &'static str) -> PolicyResultLabel {
        PolicyResultLabel { namespace: self.namespace.clone(), policy: self.policy.clone(), result }
    }

    /// This policy's series of `condition` in `status`.
    fn condition(&self, condition: &'static str, status: &'static str) -> ConditionLabel {
        ConditionLabel { namespace: self.namespace.clone(), policy: self.policy.clone(), condition, status }
    }
}

/// A policy's series with one more label, such as a fetch's result or a failure's kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyResultLabel {
    pub namespace: String,
    pub policy: String,
    pub result: &'static str,
}

/// One of a policy's conditions in one status; the series of the status it has is 1, the others 0
/// (as kube-state-metrics exports Pod conditions).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    pub namespace: String,
    pub policy: String,
    pub condition: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

/// The condition types and statuses `policy_condition` has series for.
pub const CONDITIONS: [&str; 5] = ["Ready", "RendezvousReachable", "Degraded", "Conflict", "MeshAsPlanned"];
pub const STATUSES: [&str; 3] = ["True", "False", "Unknown"];
/// The results `presence_fetches` counts (`presence_errors` counts `FetchError::REASONS`).
const FETCH_RESULTS: [&str; 3] = ["ok", "not_modified", "error"];

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub step_duration: Family<StepLabel, Histogram>,
    pub reconcile_errors: Family<KindLabel, Counter>,
    pub presence_fetches: Family<PolicyResultLabel, Counter>,
    pub presence_duration: Family<PolicyLabel, Histogram>,
    pub presence_bytes: Family<PolicyLabel, Counter>,
    pub presence_errors: Family<PolicyResultLabel, Counter>,
    /// Pod writes by result: `ok`, or why one failed (see `apply::WriteError::kind`).
    pub pod_patches: Family<ResultLabel, Counter>,
    pub incremental_mismatches: Counter,
    pub watch_errors: Family<WatchLabel, Counter>,
    /// The policy's gauges, named after the status fields they mirror.
    pub selected: Family<PolicyLabel, Gauge>,
    pub eligible: Family<PolicyLabel, Gauge>,
    pub assigned: Family<PolicyLabel, Gauge>,
    pub links: Family<PolicyLabel, Gauge>,
    pub max_degree: Family<PolicyLabel, Gauge>,
    pub max_peers: Family<PolicyLabel, Gauge>,
    pub condition: Family<ConditionLabel, Gauge>,
    pub leader: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            reconciles: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            step_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))),
            reconcile_errors: Family::default(),
            presence_fetches: Family::default(),
            presence_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 14))),
            presence_bytes: Family::default(),
            presence_errors: Family::default(),
            pod_patches: Family::default(),
            incremental_mismatches: Counter::default(),
            watch_errors: Family::default(),
            selected: Family::default(),
            eligible: Family::default(),
            assigned: Family::default(),
            links: Family::default(),
            max_degree: Family::default(),
            max_peers: Family::default(),
            condition: Family::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        let mut root = Registry::default();
        root.register_collector(Box::new(crate::process::Collector));
        let registry = root.sub_registry_with_prefix("mesh_operator");
        let build = Family::<BuildLabel, Gauge>::default();
        build.get_or_create(&BuildLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("build_info", "1, labelled with the operator's version", build);
        registry.register("reconciles", "Reconciles by result", m.reconciles.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration", m.reconcile_duration.clone());
        registry.register(
            "reconcile_step_duration_seconds",
            "Time a reconcile spends in each step (presence, wait, gather, decide, write, status)",
            m.step_duration.clone(),
        );
        registry.register("reconcile_errors", "Reconcile errors by kind", m.reconcile_errors.clone());
        registry.register(
            "presence_fetches",
            "Presence fetches by policy and result (ok, not_modified, error)",
            m.presence_fetches.clone(),
        );
        registry.register("presence_fetch_duration_seconds", "Presence fetch duration", m.presence_duration.clone());
        registry.register("presence_bytes", "Presence body bytes read", m.presence_bytes.clone());
        registry.register(
            "presence_errors",
            "Failed presence fetches by policy and reason (result: the RendezvousReachable reason)",
            m.presence_errors.clone(),
        );
        registry.register(
            "pod_patches",
            "Pod writes by result: ok, stale (the Pod changed since the decision; decided again), fenced, timed_out, failed",
            m.pod_patches.clone(),
        );
        registry.register(
            "incremental_mismatches",
            "Reconciles whose kept view differed from one built from scratch (checked with --check-incremental)",
            m.incremental_mismatches.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch errors by watch and kind (expired: a 410 that forces a relist)",
            m.watch_errors.clone(),
        );
        registry.register("policy_selected", "Pods a policy selects (status.selected)", m.selected.clone());
        registry.register("policy_eligible", "Eligible agents of a policy (status.eligible)", m.eligible.clone());
        registry.register("policy_assigned", "Agents carrying their assignment (status.assigned)", m.assigned.clone());
        registry.register("policy_links", "Links in a policy's plan (status.links)", m.links.clone());
        registry.register(
            "policy_max_degree",
            "The most links any agent has in a policy's plan (status.maxDegree)",
            m.max_degree.clone(),
        );
        registry.register("policy_max_peers", "A policy's cap on links per agent (spec.maxPeers)", m.max_peers.clone());
        registry.register(
            "policy_condition",
            "1 for a policy condition's current status, 0 for the others",
            m.condition.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader Lease", m.leader.clone());
        Self { registry: root, ..m }
    }
}

impl Metrics {
    /// The gauges each policy has one series of.
    fn policy_gauges(&self) -> [&Family<PolicyLabel, Gauge>; 6] {
        [&self.selected, &self.eligible, &self.assigned, &self.links, &self.max_degree, &self.max_peers]
    }

    /// Drops a deleted policy's series, so label sets do not pile up with policies that come and go.
    pub fn forget_policy(&self, label: &PolicyLabel) {
        for family in self.policy_gauges() {
            family.remove(label);
        }
        self.presence_duration.remove(label);
        self.presence_bytes.remove(label);
        for result in FETCH_RESULTS {
            self.presence_fetches.remove(&label.with(result));
        }
        for kind in crate::presence::FetchError::REASONS {
            self.presence_errors.remove(&label.with(kind));
        }
        for (condition, status) in CONDITIONS.iter().flat_map(|c| STATUSES.iter().map(move |s| (*c, *s))) {
            self.condition.remove(&label.condition(condition, status));
        }
    }

    /// Drops every policy's series: a replica that no longer leads stops reconciling, and its last
    /// values would otherwise go on being scraped beside the new leader's.
    pub fn forget_policies(&self) {
        for family in self.policy_gauges() {
            family.clear();
        }
        self.condition.clear();
        self.presence_fetches.clear();
        self.presence_errors.clear();
        self.presence_duration.clear();
        self.presence_bytes.clear();
    }

    /// Sets a policy's condition series: 1 for `status`, 0 for the other two.
    pub fn set_condition(&self, label: &PolicyLabel, condition: &'static str, status: &str) {
        for s in STATUSES {
            self.condition.get_or_create(&label.condition(condition, s)).set(i64::from(s == status));
        }
    }

    /// Counts and logs a failed watch request; the watcher retries (and relists after a 410) on its own.
    pub fn watch_failed(&self, watch: &'static str, error: &kube::runtime::watcher::Error) {
        let kind = watch_error_kind(error);
        self.watch_errors.get_or_create(&WatchLabel { watch, kind }).inc();
        tracing::warn!(watch, kind, error = %error, "watch failed; retrying");
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// `expired` (410 Gone: the watcher relists), `forbidden` (RBAC), or `failed` (anything else).
fn watch_error_kind(error: &kube::runtime::watcher::Error) -> &'static str {
    use kube::runtime::watcher::Error as W;
    let status = match error {
        W::WatchError(status) => Some(status.code),
        W::InitialListFailed(kube::Error::Api(s))
        | W::WatchStartFailed(kube::Error::Api(s))
        | W::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    };
    match status {
        Some(410) => "expired",
        Some(403) => "forbidden",
        _ => "failed",
    }
}

/// What `/readyz` reports: true once every watch has listed its objects; and where the endpoints listen.
#[derive(Default)]
pub struct Health {
    pub synced: AtomicBool,
    /// The bound address (useful when asked for port 0).
    pub addr: std::sync::OnceLock<SocketAddr>,
}

struct HttpState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>) -> std::io::Result<()> {
    let app_health = health.clone();
    let app = Router::new()
        .route("/metrics", get(|State(s): State<Arc<HttpState>>| async move { s.metrics.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<HttpState>>| async move {
                if s.health.synced.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "watches not synced")
                }
            }),
        )
        .with_state(Arc::new(HttpState { metrics, health }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    let _ = app_health.addr.set(bound);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Error as W;

    fn status(code: u16) -> Box<kube::core::Status> {
        Box::new(kube::core::Status { code, ..Default::default() })
    }

    #[test]
    fn watch_errors_are_classified_by_status_code() {
        let cases: [(W, &str); 5] = [
            (W::WatchError(status(410)), "expired"),
            (W::WatchFailed(kube::Error::Api(status(410))), "expired"),
            (W::InitialListFailed(kube::Error::Api(status(403))), "forbidden"),
            (W::WatchStartFailed(kube::Error::Api(status(500))), "failed"),
            (W::NoResourceVersion, "failed"),
        ];
        for (error, kind) in cases {
            assert_eq!(watch_error_kind(&error), kind, "{error}");
        }
    }

    #[test]
    fn a_failed_watch_is_counted_under_its_watch_and_kind() {
        let metrics = Metrics::default();
        metrics.watch_failed("pods", &W::WatchError(status(410)));
        assert!(metrics.encode().contains(r#"mesh_operator_watch_errors_total{watch="pods",kind="expired"} 1"#));
    }

    #[test]
    fn a_policys_series_go_when_it_does_and_all_go_with_leadership() {
        let metrics = Metrics::default();
        let label = |policy: &str| PolicyLabel::new("ci", policy);
        for policy in ["a", "b"] {
            metrics.selected.get_or_create(&label(policy)).set(3);
            metrics.set_condition(&label(policy), "Ready", "Unknown");
            metrics.presence_errors.get_or_create(&label(policy).with("Timeout")).inc();
        }
        let text = metrics.encode();
        assert!(text.contains(
            r#"mesh_operator_policy_condition{namespace="ci",policy="a",condition="Ready",status="Unknown"} 1"#
        ));
        assert!(text.contains(
            r#"mesh_operator_policy_condition{namespace="ci",policy="a",condition="Ready",status="True"} 0"#
        ));
        assert!(text.contains(r#"mesh_operator_build_info{version=""#), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "process metrics carry no prefix:\n{text}");
        metrics.forget_policy(&label("a"));
        let text = metrics.encode();
        assert!(!text.contains(r#"policy="a""#), "{text}");
        assert!(text.contains(r#"mesh_operator_policy_selected{namespace="ci",policy="b"} 3"#), "{text}");
        metrics.forget_policies();
        assert!(!metrics.encode().contains(r#"policy="b""#));
    }
}
