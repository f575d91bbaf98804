//! The agent's HTTP APIs. On the metrics port (`--metrics`): `/metrics` (Prometheus) and `/healthz`. On the
//! test API's port (`--test-api`, off unless given; anyone who reaches it can write to the document):
//! - `GET /status`: `{nodeId, links: [{nodeId, direction, sinceMs, protocol, closing, standby}], planned,
//!   standbys, lost, assignmentError, cap, unreachable, rendezvousConnected, maxOpenLinks}` (`planned`: the
//!   node ids of the applied assignment, null before one; `standbys`: its standby peers, to dial or accept;
//!   `lost`: planned peers whose slots standbys may take; `cap`: the cap held now; `unreachable`: planned
//!   peers reported unreachable);
//! - `POST /updates` `{"value"?: string}`: appends an update (a new key in the document's `updates` map,
//!   `<node id prefix>-<n>`, holding `{origin, writtenAtMs, value}`); answers `{key}`;
//! - `GET /updates`: every update this agent has, `[{key, origin, value, writtenAtMs, firstSeenMs}]`, where
//!   `firstSeenMs` is when it first reached this agent (by whatever path).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agent_mesh::Agent;
use agent_mesh::presence::now_ms;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::json;
use yrs::{Map, Observable, Transact};

/// The document map the test API writes to.
const UPDATES: &str = "updates";

struct App {
    agent: Agent,
    first_seen: Arc<Mutex<HashMap<String, f64>>>,
    written: AtomicU64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Written {
    origin: String,
    written_at_ms: f64,
    #[serde(default)]
    value: String,
}

/// The metrics port's routes.
pub fn metrics_router(agent: &Agent) -> Router {
    let mut registry = Registry::default();
    agent.metrics.register(&mut registry);
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(registry))
}

/// The test API's routes. Only an agent that serves them records when each update first arrived: that
/// record grows with every update, which an agent in production must not pay for.
pub async fn test_router(agent: Agent) -> Router {
    let first_seen = Arc::new(Mutex::new(HashMap::new()));
    let seen = first_seen.clone();
    agent
        .doc
        .read(move |d| {
            d.get_or_insert_map(UPDATES).observe("first-seen", move |txn, event| {
                let now = now_ms();
                let mut seen = seen.lock().unwrap();
                for key in event.keys(txn).keys() {
                    seen.entry(key.to_string()).or_insert(now);
                }
            })
        })
        .await;
    let app = Arc::new(App { agent, first_seen, written: AtomicU64::new(0) });
    Router::new().route("/status", get(status)).route("/updates", get(updates).post(append)).with_state(app)
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn status(State(app): State<Arc<App>>) -> impl IntoResponse {
    let s = app.agent.status.borrow().clone();
    let m = &app.agent.metrics;
    Json(json!({
        "nodeId": app.agent.identity.node_id(),
        "links": s.links,
        "planned": s.planned,
        "standbys": s.standbys,
        "lost": s.lost,
        "cap": s.cap,
        "unreachable": s.unreachable,
        "assignmentError": s.assignment_error,
        "rendezvousConnected": m.rendezvous_connected.get() == 1,
        "maxOpenLinks": m.max_open_links.get(),
    }))
}

#[derive(Deserialize, Default)]
struct Append {
    #[serde(default)]
    value: String,
}

async fn append(State(app): State<Arc<App>>, body: Option<Json<Append>>) -> impl IntoResponse {
    let me = app.agent.identity.node_id();
    let key = format!("{}-{}", &me[..12], app.written.fetch_add(1, Ordering::Relaxed));
    let entry = Written { origin: me, written_at_ms: now_ms(), value: body.map(|b| b.0.value).unwrap_or_default() };
    let text = serde_json::to_string(&entry).expect("entries serialize");
    let k = key.clone();
    app.agent
        .doc
        .edit(move |d| {
            let map = d.get_or_insert_map(UPDATES);
            let mut txn = d.transact_mut();
            map.insert(&mut txn, k, text);
            txn.encode_update_v1()
        })
        .await;
    Json(json!({ "key": key }))
}

async fn updates(State(app): State<Arc<App>>) -> impl IntoResponse {
    let seen = app.first_seen.clone();
    let list = app
        .agent
        .doc
        .read(move |d| {
            let map = d.get_or_insert_map(UPDATES);
            let txn = d.transact();
            let seen = seen.lock().unwrap();
            let mut out: Vec<serde_json::Value> = map
                .iter(&txn)
                .filter_map(|(k, v)| {
                    let w: Written = serde_json::from_str(&v.to_string(&txn)).ok()?;
                    Some(json!({"key": k, "origin": w.origin, "value": w.value, "writtenAtMs": w.written_at_ms,
                                "firstSeenMs": seen.get(k)}))
                })
                .collect();
            out.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
            out
        })
        .await
        .unwrap_or_default();
    Json(list)
}
