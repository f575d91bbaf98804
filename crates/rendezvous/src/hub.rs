//! The sync hub: agents link to it as to any agent (mutual TLS with their node keys, then the agent-mesh
//! handshake, in which each announces its address and hostname and proves the join token), and the hub
//! relays the Yjs document between them. Presence comes from these sessions: alive while connected, last seen at the
//! last frame (heartbeats included), unreachable peers as the agent last reported them. The hub also writes
//! presence into the document's `nodes` map, where agents running the seed's scheme read it.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use agent_mesh::doc::Doc;
use agent_mesh::handshake::Refusal;
use agent_mesh::health::Health;
use agent_mesh::identity::Identity;
use agent_mesh::presence::{Entry, NODES};
use agent_mesh::tls::Credentials;
use agent_mesh::transport::Inbound;
use tokio::sync::oneshot;
use yrs::{Map, Transact};

use crate::{Shared, now_ms};

/// Presence entries in the document are refreshed at least this often (the seed ignores entries older
/// than ten minutes).
const DOC_REFRESH_MS: f64 = 30_000.0;
/// How often the hub tells each agent it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long the hub remembers an agent after its session ended (longer than any sensible
/// `heartbeatTimeout`): a fleet that churns, or a token holder minting keys, cannot grow it forever.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// An agent known from a session.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connected {
    pub address: String,
    pub hostname: Option<String>,
    pub alive: bool,
    pub last_seen_ms: f64,
    /// When the hub first saw this node (the presence list's order).
    pub order: u64,
    /// The planned peers it last reported it cannot reach (see [`agent_mesh::health`]).
    pub unreachable: Vec<String>,
    #[serde(skip)]
    session: u64,
}

/// The hub's own part of the state (`/admin/state` shows the agents connected).
#[derive(serde::Serialize)]
pub struct Hub {
    #[serde(skip)]
    pub identity: Arc<Identity>,
    #[serde(skip)]
    pub creds: Arc<Credentials>,
    #[serde(skip)]
    pub doc: Doc,
    pub connected: BTreeMap<String, Connected>,
    #[serde(skip)]
    sessions: HashMap<u64, oneshot::Sender<Refusal>>,
    #[serde(skip)]
    next: u64,
    #[serde(skip)]
    written: HashMap<String, (bool, f64)>,
    /// See [`FORGET_AFTER`].
    #[serde(skip)]
    pub forget_after: Duration,
}

impl Hub {
    /// A hub with the node key `identity`. Needs a tokio runtime (the document runs as a task).
    pub fn new(identity: Identity) -> Self {
        let metrics = agent_mesh::doc::DocMetrics::default();
        Hub {
            creds: Arc::new(Credentials::new(&identity)),
            identity: Arc::new(identity),
            doc: Doc::spawn(metrics),
            connected: BTreeMap::new(),
            sessions: HashMap::new(),
            next: 0,
            written: HashMap::new(),
            forget_after: FORGET_AFTER,
        }
    }

    /// Closes every session (the agents redial); `forget`: also forget every agent, as a rendezvous that
    /// restarts empty does.
    pub fn kick_all(&mut self, forget: bool) {
        for (_, close) in self.sessions.drain() {
            let _ = close.send(Refusal::Unplanned);
        }
        if forget {
            self.connected.clear();
        } else {
            self.connected.values_mut().for_each(|c| c.alive = false);
        }
    }
}

/// One agent's session, from its admitted handshake to its end. The hub admits any node that proves the
/// join token (when one is set) and announces an address.
pub async fn session(state: Shared, mut inbound: Inbound) {
    let (token, doc, down) = {
        let st = state.lock().unwrap();
        (st.token.clone(), st.hub.doc.clone(), st.fail == crate::FailMode::Down)
    };
    if down {
        return;
    }
    if token.is_some_and(|t| !inbound.proves(&t)) {
        return inbound.refuse(Refusal::Unauthenticated).await;
    }
    let (node_id, hello) = (inbound.node_id.clone(), inbound.hello.clone());
    let Some(address) = hello.address.clone().filter(|a| a.len() <= 2048) else {
        return inbound.refuse(Refusal::NotPlanned).await;
    };
    let (close, closed) = oneshot::channel();
    let session = {
        let mut st = state.lock().unwrap();
        let hub = &mut st.hub;
        hub.next += 1;
        let (session, order) = (hub.next, hub.connected.get(&node_id).map_or(hub.next, |c| c.order));
        // One session per node: a newer one replaces the older.
        if let Some(old) = hub.connected.get(&node_id).and_then(|c| hub.sessions.remove(&c.session)) {
            let _ = old.send(Refusal::Duplicate);
        }
        hub.sessions.insert(session, close);
        let hostname = hello.hostname.clone().filter(|h| h.len() <= 253);
        let entry =
            Connected { address, hostname, alive: true, last_seen_ms: now_ms(), order, unreachable: vec![], session };
        hub.connected.insert(node_id.clone(), entry);
        st.changed();
        session
    };
    if inbound.welcome().await.is_ok() {
        let heard = |text: Option<&str>| heard(&state, &node_id, session, text);
        let talk = agent_mesh::transport::Talk { heartbeat: HEARTBEAT, report: None, heard };
        let link = agent_mesh::mesh::next_link();
        agent_mesh::transport::run_link(inbound.wire, doc, link, false, closed, talk).await;
    }
    let mut st = state.lock().unwrap();
    st.hub.sessions.remove(&session);
    if let Some(c) = st.hub.connected.get_mut(&node_id).filter(|c| c.session == session) {
        c.alive = false;
        st.changed();
    }
}

/// A frame from an agent: it is alive, and a health report replaces the one it sent before.
fn heard(state: &Shared, id: &str, session: u64, text: Option<&str>) {
    let report = match text.map(Health::parse) {
        Some(Ok(report)) => report,
        Some(Err(e)) => {
            // Debug only: an agent could send a flood of them.
            tracing::debug!(node = %id.get(..12).unwrap_or(id), error = %e, "ignored a report");
            None
        }
        None => None,
    };
    let mut st = state.lock().unwrap();
    let Some(c) = st.hub.connected.get_mut(id).filter(|c| c.session == session) else { return };
    c.last_seen_ms = now_ms();
    if let Some(h) = report.filter(|h| h.unreachable != c.unreachable) {
        c.unreachable = h.unreachable;
        st.changed();
    }
}

/// Writes presence into the document whenever an agent's liveness changes, refreshes each live agent's
/// entry at least every [`DOC_REFRESH_MS`], and forgets agents gone longer than `forget_after` (from the
/// presence list and the document).
pub async fn write_presence(state: Shared) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (doc, changed, forgotten) = {
            let mut guard = state.lock().unwrap();
            let st = &mut *guard;
            let now = now_ms();
            let hub = &mut st.hub;
            let forget_after = hub.forget_after.as_secs_f64() * 1000.0;
            let gone = |c: &Connected| !c.alive && now - c.last_seen_ms >= forget_after;
            let forgotten: Vec<String> =
                hub.connected.iter().filter(|(_, c)| gone(c)).map(|(id, _)| id.clone()).collect();
            for id in &forgotten {
                hub.connected.remove(id);
                hub.written.remove(id);
            }
            if !forgotten.is_empty() {
                st.changes.send_replace(());
            }
            let mut changed = Vec::new();
            for (id, c) in &hub.connected {
                let stale = hub
                    .written
                    .get(id)
                    .is_none_or(|(alive, at)| *alive != c.alive || (c.alive && now - at > DOC_REFRESH_MS));
                if stale {
                    changed.push(Entry {
                        node_id: id.clone(),
                        address: c.address.clone(),
                        alive: c.alive,
                        last_seen_ms: c.last_seen_ms,
                        hostname: c.hostname.clone(),
                        order: c.order,
                    });
                }
            }
            for e in &changed {
                hub.written.insert(e.node_id.clone(), (e.alive, now));
            }
            (hub.doc.clone(), changed, forgotten)
        };
        if changed.is_empty() && forgotten.is_empty() {
            continue;
        }
        doc.edit(move |d| {
            let map = d.get_or_insert_map(NODES);
            let mut txn = d.transact_mut();
            for e in changed {
                map.insert(&mut txn, e.node_id.clone(), serde_json::to_string(&e).expect("entries serialize"));
            }
            for id in forgotten {
                map.remove(&mut txn, &id);
            }
            txn.encode_update_v1()
        })
        .await;
    }
}
