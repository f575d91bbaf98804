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

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub step_duration: Family<StepLabel, Histogram>,
    pub reconcile_errors: Family<KindLabel, Counter>,
    pub presence_fetches: Family<ResultLabel, Counter>,
    pub presence_duration: Histogram,
    pub presence_bytes: Counter,
    pub presence_errors: Family<KindLabel, Counter>,
    pub pod_patches: Counter,
    pub incremental_mismatches: Counter,
    pub watch_errors: Family<WatchLabel, Counter>,
    pub agents: Family<PolicyLabel, Gauge>,
    pub eligible: Family<PolicyLabel, Gauge>,
    pub links: Family<PolicyLabel, Gauge>,
    pub max_links: Family<PolicyLabel, Gauge>,
    pub leader: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mesh_operator");
        let m = Self {
            reconciles: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            step_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))),
            reconcile_errors: Family::default(),
            presence_fetches: Family::default(),
            presence_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            presence_bytes: Counter::default(),
            presence_errors: Family::default(),
            pod_patches: Counter::default(),
            incremental_mismatches: Counter::default(),
            watch_errors: Family::default(),
            agents: Family::default(),
            eligible: Family::default(),
            links: Family::default(),
            max_links: Family::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles by result", m.reconciles.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration", m.reconcile_duration.clone());
        registry.register(
            "reconcile_step_duration_seconds",
            "Time a reconcile spends in each step (presence, wait, gather, decide, write, status)",
            m.step_duration.clone(),
        );
        registry.register("reconcile_errors", "Reconcile errors by kind", m.reconcile_errors.clone());
        registry.register("presence_fetches", "Presence fetches by result", m.presence_fetches.clone());
        registry.register("presence_fetch_duration_seconds", "Presence fetch duration", m.presence_duration.clone());
        registry.register("presence_bytes", "Presence body bytes read", m.presence_bytes.clone());
        registry.register("presence_errors", "Presence fetch errors by reason", m.presence_errors.clone());
        registry.register("pod_patches", "Pod annotation patches sent", m.pod_patches.clone());
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
        registry.register("policy_agents", "Pods a policy selects", m.agents.clone());
        registry.register("policy_eligible", "Eligible agents of a policy", m.eligible.clone());
        registry.register("policy_links", "Links in a policy's plan", m.links.clone());
        registry.register(
            "policy_max_links",
            "Largest link count of any agent in a policy's plan",
            m.max_links.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader Lease", m.leader.clone());
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Drops a deleted policy's series, so label sets do not pile up with policies that come and go.
    pub fn forget_policy(&self, label: &PolicyLabel) {
        for family in [&self.agents, &self.eligible, &self.links, &self.max_links] {
            family.remove(label);
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
}
