//! The rendezvous for mesh-operator's tests, benchmarks and demo. A real sync hub for real agents
//! ([`hub`]: agent links, TLS with the hub's node key, on the same port as the HTTP API; the Yjs document
//! relayed between them, presence derived from the sessions), plus simulated agents (for scale) and failure modes (for outages), all served by the
//! presence API the operator reads (`GET /presence`, with `nowMs` and an ETag). A presence request with
//! `Prefer: wait=<s>` and a current `If-None-Match` is held until an agent is added, removed or changes in more
//! than its heartbeat, or for that many seconds (60 at most), and answered with `Preference-Applied`.
//!
//! Admin API (JSON): `POST /admin/agents` `{nodeId, address, hostname?}` adds or replaces an agent;
//! `DELETE /admin/agents/{id}` removes it; `POST /admin/agents/{id}/kill` marks it not alive;
//! `POST /admin/agents/{id}/stop-heartbeat` freezes its heartbeat; `POST /admin/agents/{id}/zone` `{zone}`
//! sets the zone it reports (null: none); `POST /admin/token` `{token}` requires a
//! bearer token (null: none); `POST /admin/fail` `{mode}` with mode `none`, `status500`, `hang`, `garbage`,
//! `oversized` or `down` (every session closed, new ones and presence answered 503);
//! `POST /admin/restart-empty` forgets every agent and closes every session, as a restarted rendezvous
//! does before its agents reconnect; `GET /admin/state` shows it all.
pub mod hub;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_mesh::transport::{self, Gate, Pass, Protocols, TLS_HANDSHAKE_RECORD};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::LazyConfigAcceptor;

use crate::hub::Hub;

pub use agent_mesh::presence::now_ms;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailMode {
    #[default]
    None,
    Status500,
    Hang,
    Garbage,
    Oversized,
    Down,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SimAgent {
    pub node_id: String,
    pub address: String,
    #[serde(default)]
    pub hostname: Option<String>,
    /// The zone the agent reports, as a rendezvous that carries one would. mesh-operator itself takes an
    /// agent's domain from its Pod or Node label (docs/design.md §3.1), never from presence.
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default = "yes")]
    pub alive: bool,
    /// Frozen heartbeat (ms); `None` while heartbeating.
    #[serde(default)]
    pub frozen_at_ms: Option<f64>,
    /// The peers it reports unreachable, as a real agent would (see `agent_mesh::health`).
    #[serde(default)]
    pub unreachable: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Serialize)]
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
    /// The sync hub: real agents' sessions and the document.
    pub hub: Hub,
    /// Told of changes made through the admin API and the hub: held presence requests look again at once.
    #[serde(skip)]
    pub changes: tokio::sync::watch::Sender<()>,
    /// Presence requests held (`Prefer: wait`), and how many of them a change let go before their wait.
    pub held: u64,
    pub released: u64,
    /// The link protocols the hub speaks (both during an upgrade from agents before TLS).
    #[serde(skip)]
    pub protocols: Protocols,
}

pub type Shared = Arc<Mutex<SimState>>;

/// The state of a rendezvous with the node key `identity`, whose presence names itself `server_node_id`
/// (None: its own node id). Needs a tokio runtime.
pub fn new_state(identity: agent_mesh::identity::Identity, server_node_id: Option<&str>) -> Shared {
    let hub = Hub::new(identity);
    let server_node_id = server_node_id.map_or_else(|| hub.identity.node_id(), str::to_string);
    let state = Arc::new(Mutex::new(SimState {
        server_node_id,
        agents: BTreeMap::new(),
        token: None,
        fail: FailMode::None,
        requests: 0,
        bearer_requests: 0,
        raw_body: None,
        hub,
        changes: tokio::sync::watch::Sender::new(()),
        held: 0,
        released: 0,
        protocols: Protocols::V2,
    }));
    tokio::spawn(hub::write_presence(state.clone()));
    state
}

impl SimState {
    /// Has held presence requests look at the list again: it may have changed.
    pub fn changed(&self) {
        self.changes.send_replace(());
    }
}

pub fn router(state: Shared) -> Router {
    // Every admin write may change the list: each lets held presence requests go.
    let changes = axum::middleware::from_fn_with_state(
        state.clone(),
        |State(s): State<Shared>, req: Request, next: Next| async move {
            let write = req.method() != axum::http::Method::GET;
            let response = next.run(req).await;
            if write {
                s.lock().unwrap().changed();
            }
            response
        },
    );
    let admin = Router::new()
        .route("/admin/restart-empty", post(restart_empty))
        .route("/admin/state", get(|State(s): State<Shared>| async move { Json(json!(*s.lock().unwrap())) }))
        .route("/admin/agents", post(add_agent))
        .route("/admin/agents/{id}", axum::routing::delete(remove_agent))
        .route("/admin/agents/{id}/kill", post(kill_agent))
        .route("/admin/agents/{id}/stop-heartbeat", post(stop_heartbeat))
        .route("/admin/agents/{id}/zone", post(set_zone))
        .route("/admin/token", post(set_token))
        .route("/admin/fail", post(set_fail))
        .route_layer(changes);
    Router::new().route("/presence", get(presence)).merge(admin).with_state(state)
}

/// The longest hold a presence request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

async fn presence(State(s): State<Shared>, headers: HeaderMap) -> Response {
    {
        let mut st = s.lock().unwrap();
        st.requests += 1;
        if headers.contains_key(header::AUTHORIZATION) {
            st.bearer_requests += 1;
        }
        if !agent_mesh::transport::token_ok(
            st.token.as_deref(),
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
        ) {
            return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
        }
    }
    let wait = requested_wait(&headers);
    if let Some(wait) = wait {
        hold(&s, &headers, wait).await;
    }
    let mut response = answer(&s, &headers).await;
    if let Some(wait) = wait.filter(|_| response.status().is_success() || response.status() == StatusCode::NOT_MODIFIED)
    {
        let applied = header::HeaderValue::from_str(&format!("wait={}", wait.as_secs())).expect("a header value");
        response.headers_mut().insert("preference-applied", applied);
    }
    response
}

/// The wait a request prefers (RFC 7240 `Prefer: wait=<seconds>`), at most [`MAX_WAIT`].
fn requested_wait(headers: &HeaderMap) -> Option<Duration> {
    let prefer = headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok());
    let wait = prefer.flat_map(|v| v.split([',', ';'])).find_map(|p| p.trim().strip_prefix("wait=")?.parse().ok());
    wait.map(|s: u64| Duration::from_secs(s).min(MAX_WAIT))
}

/// How often a held request looks at the list without being told of a change (for edits made to the state
/// directly, as tests make).
const RECHECK: Duration = Duration::from_millis(100);

/// Holds a request whose `If-None-Match` names the list as it is until the list changes in more than
/// heartbeats, or for `wait`.
async fn hold(s: &Shared, headers: &HeaderMap, wait: Duration) {
    let Some(seen) = headers.get(header::IF_NONE_MATCH).and_then(|v| membership_of(v.to_str().ok()?)) else {
        return;
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = s.lock().unwrap().changes.subscribe();
    let mut held = false;
    loop {
        {
            let mut st = s.lock().unwrap();
            if membership(&st) != seen || st.fail != FailMode::None || st.raw_body.is_some() {
                st.released += u64::from(held);
                return;
            }
            st.held += u64::from(!held);
            held = true;
        }
        let look_again = deadline.min(tokio::time::Instant::now() + RECHECK);
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep_until(look_again) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
    }
}

/// The list without its heartbeats, hashed: what a held request waits to see change.
fn membership(st: &SimState) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for a in st.agents.values() {
        let heartbeat = a.frozen_at_ms.map(f64::to_bits);
        (&a.node_id, &a.address, a.alive, &a.hostname, &a.zone, heartbeat, &a.unreachable).hash(&mut h);
    }
    for (id, c) in &st.hub.connected {
        (id, &c.address, c.alive, &c.hostname, &c.unreachable).hash(&mut h);
    }
    h.finish()
}

/// The membership hash an ETag of ours names (`"<membership>-<body>"`).
fn membership_of(etag: &str) -> Option<u64> {
    u64::from_str_radix(etag.trim_matches('"').split_once('-')?.0, 16).ok()
}

/// The answer to an authorized presence request.
async fn answer(s: &Shared, headers: &HeaderMap) -> Response {
    let (fail, nodes, server, membership) = {
        let st = s.lock().unwrap();
        if let Some(raw) = st.raw_body.clone() {
            return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from(raw.to_vec()))
                .into_response();
        }
        (st.fail, nodes(&st), st.server_node_id.clone(), membership(&st))
    };
    match fail {
        FailMode::None => {
            let etag = format!("\"{membership:x}-{:x}\"", hash(nodes.as_bytes()));
            if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
                return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
            }
            // The nodes array, serialized once for the ETag, goes into the body as it is.
            let body = format!(r#"{{"serverNodeId":{},"nowMs":{},"nodes":{nodes}}}"#, json!(server), json!(now_ms()));
            ([(header::ETAG, etag), (header::CONTENT_TYPE, "application/json".into())], body).into_response()
        }
        FailMode::Down => (StatusCode::SERVICE_UNAVAILABLE, "rendezvous down").into_response(),
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

/// One presence entry as the rendezvous serves it.
#[derive(Serialize)]
struct Entry<'a> {
    node_id: &'a str,
    address: &'a str,
    alive: bool,
    last_seen: f64,
    last_seen_ms: f64,
    hostname: Option<&'a str>,
    /// Simulated agents report theirs (`null`: none); the hub's real ones carry none.
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<Option<&'a str>>,
    /// The planned peers the agent reports it cannot reach.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    unreachable: &'a [String],
}

/// The JSON array of the simulated agents (a live one has just heartbeated, so while any is live the ETag
/// changes with every read) and the hub's real ones (last seen at their last frame).
fn nodes(st: &SimState) -> String {
    let now = now_ms();
    let sim = st.agents.values().map(|a| {
        let seen = a.frozen_at_ms.unwrap_or(now);
        Entry {
            node_id: &a.node_id,
            address: &a.address,
            alive: a.alive,
            last_seen: seen / 1000.0,
            last_seen_ms: seen,
            hostname: a.hostname.as_deref(),
            zone: Some(a.zone.as_deref()),
            unreachable: &a.unreachable,
        }
    });
    let real = st.hub.connected.iter().map(|(id, c)| Entry {
        node_id: id,
        address: &c.address,
        alive: c.alive,
        last_seen: c.last_seen_ms / 1000.0,
        last_seen_ms: c.last_seen_ms,
        hostname: c.hostname.as_deref(),
        zone: None,
        unreachable: &c.unreachable,
    });
    serde_json::to_string(&sim.chain(real).collect::<Vec<_>>()).expect("presence entries serialize")
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

async fn restart_empty(State(s): State<Shared>) -> StatusCode {
    let mut st = s.lock().unwrap();
    st.agents.clear();
    st.hub.kick_all(true);
    StatusCode::NO_CONTENT
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
    let mut st = s.lock().unwrap();
    st.fail = b.mode;
    if b.mode == FailMode::Down {
        st.hub.kick_all(false);
    }
    StatusCode::NO_CONTENT
}

/// Serves the simulator on `listener` until the task is dropped: agent links (TLS with the hub's node key,
/// ALPN `agentmesh/2`) go to the hub, everything else to the HTTP API, over TLS when `https` is given.
pub async fn serve(listener: TcpListener, state: Shared, https: Option<Arc<ServerConfig>>) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let (http, rx) = mpsc::channel(64);
    let sort = Sorter { state: state.clone(), gate: Gate::new(1024, 8), https, http };
    // One future: dropping it (a stopped rendezvous) closes the listener too.
    tokio::select! {
        () = sort.run(listener) => Ok(()),
        served = axum::serve(Http { rx, local }, router(state)) => served,
    }
}

/// Takes each TCP connection apart: an agent link, or HTTP (plain or https) for the router.
struct Sorter {
    state: Shared,
    /// Bounds connections that have not finished their handshakes.
    gate: Arc<Gate>,
    https: Option<Arc<ServerConfig>>,
    http: mpsc::Sender<(Io, SocketAddr)>,
}

impl Sorter {
    async fn run(self, listener: TcpListener) {
        let sort = Arc::new(self);
        loop {
            let Ok((tcp, addr)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some(pass) = sort.gate.enter(addr.ip()) else { continue };
            let sort = sort.clone();
            tokio::spawn(async move {
                if let Err(e) = sort.one(tcp, addr, pass).await {
                    tracing::debug!(%addr, error = %e, "connection dropped during its handshake");
                }
            });
        }
    }

    async fn one(&self, tcp: TcpStream, addr: SocketAddr, pass: Pass) -> Result<(), String> {
        let (creds, protocols) = {
            let st = self.state.lock().unwrap();
            (st.hub.creds.clone(), st.protocols)
        };
        let Some(https) = self.https.clone() else {
            let speaks = match what_it_speaks(&tcp, protocols).await {
                Some(speaks) => speaks,
                None => {
                    drop(pass);
                    return self.http.send((Io::Plain(tcp), addr)).await.map_err(|e| e.to_string());
                }
            };
            let inbound = transport::accept_in(tcp, &creds, speaks).await.map_err(|e| e.to_string())?;
            drop(pass);
            hub::session(self.state.clone(), inbound).await;
            return Ok(());
        };
        let start = tokio::time::timeout(HANDSHAKE, LazyConfigAcceptor::new(Default::default(), tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let link = start.client_hello().alpn().is_some_and(|mut p| p.any(|p| p == agent_mesh::tls::ALPN));
        let config = if link { creds.server() } else { https };
        let tls = tokio::time::timeout(HANDSHAKE, start.into_stream(config))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if !link {
            drop(pass);
            return self.http.send((Io::Tls(Box::new(tls)), addr)).await.map_err(|e| e.to_string());
        }
        let inbound = transport::upgrade(tls).await.map_err(|e| e.to_string())?;
        drop(pass);
        hub::session(self.state.clone(), inbound).await;
        Ok(())
    }
}

/// The link protocol a plain-port connection speaks, or None for HTTP: a TLS record is protocol 2, and
/// during an upgrade a WebSocket request for `/crdt-sync` is protocol 1.
async fn what_it_speaks(tcp: &TcpStream, protocols: Protocols) -> Option<Protocols> {
    const V1_REQUEST: &[u8] = b"GET /crdt-sync";
    let mut first = [0u8; V1_REQUEST.len()];
    let peek = async {
        loop {
            match tcp.peek(&mut first).await {
                Ok(n) if n > 0 && first[0] == TLS_HANDSHAKE_RECORD => return Some(Protocols::V2),
                Ok(n) if n >= V1_REQUEST.len() || n == 0 || !V1_REQUEST.starts_with(&first[..n]) => {
                    return (protocols.v1 && first == V1_REQUEST).then_some(Protocols::V1);
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(HANDSHAKE, peek).await.ok().flatten()
}
/// A connection must show what it is, and finish its TLS handshake, within this.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// The HTTP connections the [`Sorter`] passes on, as axum's listener.
struct Http {
    rx: mpsc::Receiver<(Io, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Http {
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Io, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The sorter ended (its listener is gone): nothing more will arrive.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// An HTTP connection, plain or https.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
