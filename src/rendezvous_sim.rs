//! A rendezvous simulator for tests and the demo: serves the presence API (DESIGN §3.3) for simulated agents
//! with live heartbeats, and an admin API to change the fleet and to fail on purpose.
//!
//! Admin API (JSON): `POST /admin/agents` `{nodeId, address, hostname?}` adds or replaces an agent;
//! `DELETE /admin/agents/{id}` removes it; `POST /admin/agents/{id}/kill` marks it not alive;
//! `POST /admin/agents/{id}/stop-heartbeat` freezes its heartbeat; `POST /admin/agents/{id}/zone` `{zone}`
//! sets the zone it reports (null: none); `POST /admin/token` `{token}` requires a
//! bearer token (null: none); `POST /admin/fail` `{mode}` with mode `none`, `status500`, `hang`, `garbage` or
//! `oversized`; `GET /admin/state` shows it all.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_rustls::TlsAcceptor;

use crate::presence::unix_ms as now_ms;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailMode {
    #[default]
    None,
    Status500,
    Hang,
    Garbage,
    Oversized,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SimAgent {
    pub node_id: String,
    pub address: String,
    #[serde(default)]
    pub hostname: Option<String>,
    /// The zone the agent reports, as a rendezvous that carries one would. mesh-operator itself takes an
    /// agent's domain from its Pod or Node label (DESIGN §3.1), never from presence.
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default = "yes")]
    pub alive: bool,
    /// Frozen heartbeat (ms); `None` while heartbeating.
    #[serde(default)]
    pub frozen_at_ms: Option<f64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimState {
    pub server_node_id: String,
    pub agents: BTreeMap<String, SimAgent>,
    pub token: Option<String>,
    pub fail: FailMode,
    pub requests: u64,
    /// Presence requests that carried an `Authorization` header.
    pub bearer_requests: u64,
    /// A body served verbatim instead of the agents (for size and memory tests).
    #[serde(skip)]
    pub raw_body: Option<Arc<Vec<u8>>>,
}

pub type Shared = Arc<Mutex<SimState>>;

pub fn new_state(server_node_id: &str) -> Shared {
    Arc::new(Mutex::new(SimState { server_node_id: server_node_id.into(), ..Default::default() }))
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/presence", get(presence))
        .route("/admin/state", get(|State(s): State<Shared>| async move { Json(json!(*s.lock().unwrap())) }))
        .route("/admin/agents", post(add_agent))
        .route("/admin/agents/{id}", axum::routing::delete(remove_agent))
        .route("/admin/agents/{id}/kill", post(kill_agent))
        .route("/admin/agents/{id}/stop-heartbeat", post(stop_heartbeat))
        .route("/admin/agents/{id}/zone", post(set_zone))
        .route("/admin/token", post(set_token))
        .route("/admin/fail", post(set_fail))
        .with_state(state)
}

async fn presence(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let (fail, body) = {
        let mut st = s.lock().unwrap();
        st.requests += 1;
        if headers.contains_key(header::AUTHORIZATION) {
            st.bearer_requests += 1;
        }
        if let Some(token) = &st.token {
            let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if sent != Some(format!("Bearer {token}").as_str()) {
                return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
            }
        }
        if let Some(raw) = st.raw_body.clone() {
            return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from(raw.to_vec()))
                .into_response();
        }
        let now = now_ms();
        let nodes: Vec<serde_json::Value> = st
            .agents
            .values()
            .map(|a| {
                let seen = a.frozen_at_ms.unwrap_or(now);
                json!({"node_id": a.node_id, "address": a.address, "alive": a.alive,
                       "last_seen": seen / 1000.0, "last_seen_ms": seen, "hostname": a.hostname, "zone": a.zone})
            })
            .collect();
        (st.fail, json!({"serverNodeId": st.server_node_id, "nowMs": now, "nodes": nodes}))
    };
    match fail {
        FailMode::None => Json(body).into_response(),
        FailMode::Status500 => (StatusCode::INTERNAL_SERVER_ERROR, "simulated failure").into_response(),
        FailMode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        FailMode::Garbage => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"nodes\": [{\"node_id\": tru")
                .into_response()
        }
        FailMode::Oversized => {
            // 64 MiB of a valid-looking array, streamed: a client without a cap would buffer it all.
            let chunk = bytes_of(b' ', 1 << 20);
            let stream = futures::stream::iter((0..64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
        }
    }
}

fn bytes_of(b: u8, n: usize) -> axum::body::Bytes {
    axum::body::Bytes::from(vec![b; n])
}

async fn add_agent(State(s): State<Shared>, Json(agent): Json<SimAgent>) -> StatusCode {
    s.lock().unwrap().agents.insert(agent.node_id.clone(), agent);
    StatusCode::NO_CONTENT
}

async fn remove_agent(State(s): State<Shared>, Path(id): Path<String>) -> StatusCode {
    if s.lock().unwrap().agents.remove(&id).is_some() { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND }
}

fn with_agent(s: &Shared, id: &str, f: impl FnOnce(&mut SimAgent)) -> StatusCode {
    match s.lock().unwrap().agents.get_mut(id) {
        Some(a) => {
            f(a);
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

async fn kill_agent(State(s): State<Shared>, Path(id): Path<String>) -> StatusCode {
    with_agent(&s, &id, |a| a.alive = false)
}

async fn stop_heartbeat(State(s): State<Shared>, Path(id): Path<String>) -> StatusCode {
    with_agent(&s, &id, |a| a.frozen_at_ms = Some(now_ms()))
}

#[derive(Deserialize)]
struct ZoneBody {
    zone: Option<String>,
}

async fn set_zone(State(s): State<Shared>, Path(id): Path<String>, Json(b): Json<ZoneBody>) -> StatusCode {
    with_agent(&s, &id, |a| a.zone = b.zone)
}

#[derive(Deserialize)]
struct TokenBody {
    token: Option<String>,
}

async fn set_token(State(s): State<Shared>, Json(b): Json<TokenBody>) -> StatusCode {
    s.lock().unwrap().token = b.token;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct FailBody {
    mode: FailMode,
}

async fn set_fail(State(s): State<Shared>, Json(b): Json<FailBody>) -> StatusCode {
    s.lock().unwrap().fail = b.mode;
    StatusCode::NO_CONTENT
}

/// Serves the simulator on `listener` until the task is dropped; over TLS when `tls` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Shared,
    tls: Option<Arc<ServerConfig>>,
) -> std::io::Result<()> {
    match tls {
        None => axum::serve(listener, router(state)).await,
        Some(config) => axum::serve(TlsListener { tcp: listener, tls: TlsAcceptor::from(config) }, router(state)).await,
    }
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, String> {
    crate::presence::install_crypto_provider();
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate: {e}"))?;
    if chain.is_empty() {
        return Err("TLS certificate: no PEM certificate found".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("TLS key: {e}"))?;
    let config =
        ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// Accepts TCP connections and completes the TLS handshake; a failed handshake drops that connection only.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
            match tokio::time::timeout(Duration::from_secs(5), self.tls.accept(tcp)).await {
                Ok(Ok(stream)) => return (stream, addr),
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
