//! The hub with a real agent connected: presence comes from the session (with an ETag that answers 304 while
//! nothing changed), `restart-empty` forgets the agent until it reconnects, `down` closes its session and
//! answers 503, and a session without the join token is refused.
use std::time::Duration;

use agent_mesh::identity::Identity;
use agent_mesh::mesh::Selection;
use agent_mesh::transport::Protocols;
use serde_json::Value;

async fn hub() -> (String, rendezvous::Shared) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let state = rendezvous::new_state(Identity::generate(), None);
    tokio::spawn(rendezvous::serve(listener, state.clone(), None));
    (addr, state)
}

async fn agent(hub: &str, state: &rendezvous::Shared, token: Option<&str>) -> agent_mesh::Agent {
    agent_speaking(hub, state, token, Protocols::V2).await
}

async fn agent_speaking(hub: &str, state: &rendezvous::Shared, token: Option<&str>, p: Protocols) -> agent_mesh::Agent {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let advertise = p.advertise(listener.local_addr().unwrap());
    let mut config = agent_mesh::Config::new(4, advertise);
    config.protocols = p;
    let node_id = state.lock().unwrap().hub.identity.node_id();
    let url = format!("{}://{hub}/crdt-sync", if p.v2 { "wss" } else { "ws" });
    config.rendezvous = Some(agent_mesh::Pinned { url, node_id });
    config.hostname = Some("agent-7".into());
    config.join_token = token.map(str::to_string);
    config.heartbeat = Duration::from_secs(3600);
    let (_tx, rx) = tokio::sync::watch::channel(Default::default());
    agent_mesh::start(Identity::generate(), listener, config, Selection::Planned(rx))
}

/// `GET /presence` with an optional If-None-Match: (status, ETag, body).
async fn presence(hub: &str, etag: Option<&str>) -> (u16, String, Value) {
    let mut stream = tokio::net::TcpStream::connect(hub).await.unwrap();
    let inm = etag.map(|e| format!("If-None-Match: {e}\r\n")).unwrap_or_default();
    let req = format!("GET /presence HTTP/1.1\r\nHost: x\r\n{inm}Connection: close\r\n\r\n");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let etag = head.lines().find_map(|l| l.strip_prefix("etag: ")).unwrap_or_default().to_string();
    (status, etag, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn alive(body: &Value, id: &str) -> bool {
    body["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n["node_id"] == id && n["alive"] == true && n["hostname"] == "agent-7")
}

#[tokio::test]
async fn presence_follows_the_sessions() {
    let (addr, state) = hub().await;
    let a = agent(&addr, &state, None).await;
    let id = a.identity.node_id();
    wait_until("the agent in presence", async || alive(&presence(&addr, None).await.2, &id)).await;
    let (_, _, body) = presence(&addr, None).await;
    assert!(body["nowMs"].as_f64().unwrap() > 0.0);
    // Once the session is quiet, an unchanged list answers 304 to its own ETag.
    wait_until("a 304 for an unchanged list", async || {
        let (_, etag, _) = presence(&addr, None).await;
        presence(&addr, Some(&etag)).await.0 == 304
    })
    .await;

    state.lock().unwrap().hub.kick_all(true);
    wait_until("the agent back after a restart-empty", async || alive(&presence(&addr, None).await.2, &id)).await;

    state.lock().unwrap().fail = rendezvous::FailMode::Down;
    state.lock().unwrap().hub.kick_all(false);
    assert_eq!(presence(&addr, None).await.0, 503);
    wait_until("the agent to see the rendezvous gone", async || a.metrics.rendezvous_connected.get() == 0).await;
    state.lock().unwrap().fail = rendezvous::FailMode::None;
    wait_until("the agent to reconnect", async || a.metrics.rendezvous_connected.get() == 1).await;
}

/// An agent whose session ended is forgotten after `forget_after`: from the presence list and from the
/// document's `nodes` map. Until then (and while it stays gone) its entry is not rewritten.
#[tokio::test]
async fn agents_gone_long_enough_are_forgotten() {
    let (addr, state) = hub().await;
    let a = agent(&addr, &state, None).await;
    let id = a.identity.node_id();
    let doc = state.lock().unwrap().hub.doc.clone();
    let in_doc = async |id: &str| {
        let id = id.to_string();
        doc.read(move |d| {
            use yrs::{Map, Transact};
            d.get_or_insert_map(agent_mesh::presence::NODES).get(&d.transact(), &id).is_some()
        })
        .await
        .unwrap()
    };
    wait_until("the agent in the document", async || in_doc(&id).await).await;
    {
        let mut st = state.lock().unwrap();
        st.fail = rendezvous::FailMode::Down;
        st.hub.forget_after = Duration::ZERO;
        st.hub.kick_all(false);
    }
    wait_until("the agent forgotten", async || {
        !state.lock().unwrap().hub.connected.contains_key(&id) && !in_doc(&id).await
    })
    .await;
    state.lock().unwrap().fail = rendezvous::FailMode::None;
    wait_until("the agent back once it reconnects", async || alive(&presence(&addr, None).await.2, &id)).await;
}

#[tokio::test]
async fn a_session_without_the_join_token_is_refused() {
    let (addr, state) = hub().await;
    state.lock().unwrap().token = Some("t".into());
    let good = agent(&addr, &state, Some("t")).await;
    let bad = agent(&addr, &state, Some("x")).await;
    wait_until("the agent with the token to connect", async || good.metrics.rendezvous_connected.get() == 1).await;
    let body = presence_with_token(&addr).await;
    assert!(!body.contains(&bad.identity.node_id()), "the agent without the token registered");
    assert_eq!(bad.metrics.rendezvous_connected.get(), 0);
}

async fn presence_with_token(hub: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(hub).await.unwrap();
    let req = "GET /presence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n";
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    raw
}

#[tokio::test]
async fn during_an_upgrade_agents_before_tls_and_tls_agents_share_the_hub() {
    let (addr, state) = hub().await;
    state.lock().unwrap().protocols = Protocols::UPGRADE;
    state.lock().unwrap().token = Some("t".into());
    let old = agent_speaking(&addr, &state, Some("t"), Protocols::V1).await;
    let new = agent(&addr, &state, Some("t")).await;
    wait_until("both agents on the hub", async || {
        old.metrics.rendezvous_connected.get() == 1 && new.metrics.rendezvous_connected.get() == 1
    })
    .await;
    let body = presence_with_token(&addr).await;
    assert!(body.contains(&old.identity.node_id()) && body.contains(&new.identity.node_id()));
}

fn unreachable_of(body: &Value, id: &str) -> Vec<String> {
    let nodes = body["nodes"].as_array().into_iter().flatten();
    let entry = nodes.into_iter().find(|n| n["node_id"] == id).cloned().unwrap_or(Value::Null);
    entry["unreachable"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_string)).collect()
}

/// A planned peer that refuses every connection is reported after the grace period, the report reaches
/// presence (and is sent again when the rendezvous link is redialed), and a plan without that peer clears
/// it. A peer that answers, even with a refusal, is never reported.
#[tokio::test]
async fn a_planned_peer_that_cannot_be_reached_is_reported_in_presence() {
    use agent_mesh::assignment::{Assignment, Peer};
    use agent_mesh::source::Reading;
    let (addr, state) = hub().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("wss://{}/crdt-sync", closed.local_addr().unwrap());
    drop(closed);
    let (dead, refusing) = (Identity::generate().node_id(), agent(&addr, &state, None).await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = agent_mesh::Config::new(4, Protocols::V2.advertise(listener.local_addr().unwrap()));
    let node_id = state.lock().unwrap().hub.identity.node_id();
    config.rendezvous = Some(agent_mesh::Pinned { url: format!("wss://{addr}/crdt-sync"), node_id });
    config.unreachable_after = Duration::from_millis(300);
    config.backoff.max = Duration::from_millis(200);
    let (tx, rx) = tokio::sync::watch::channel(Reading::default());
    let a = agent_mesh::start(Identity::generate(), listener, config, Selection::Planned(rx));
    let id = a.identity.node_id();
    // The refusing agent does not list `a` as an accept: it answers every dial with `not_planned`.
    wait_until("the refusing agent in presence", async || {
        alive_any(&presence(&addr, None).await.2, &refusing.identity.node_id())
    })
    .await;
    let peers = vec![
        Peer { node_id: dead.clone().into(), url: dead_url.into() },
        Peer { node_id: refusing.identity.node_id().into(), url: refusing_advertise(&state, &refusing).into() },
    ];
    tx.send_replace(Reading { assignment: Some(Assignment::new(peers, [], "p".into())), error: None });
    wait_until("the dead peer in a's presence", async || {
        unreachable_of(&presence(&addr, None).await.2, &id) == [dead.clone()]
    })
    .await;
    assert_eq!(a.status.borrow().unreachable, std::slice::from_ref(&dead));

    state.lock().unwrap().hub.kick_all(false);
    wait_until("a back, still reporting", async || {
        let body = presence(&addr, None).await.2;
        alive_any(&body, &id) && unreachable_of(&body, &id) == [dead.clone()]
    })
    .await;

    tx.send_replace(Reading { assignment: Some(Assignment::new(vec![], [], "p".into())), error: None });
    wait_until("the report cleared", async || unreachable_of(&presence(&addr, None).await.2, &id).is_empty()).await;
}

fn alive_any(body: &Value, id: &str) -> bool {
    body["nodes"].as_array().into_iter().flatten().any(|n| n["node_id"] == id && n["alive"] == true)
}

/// The URL `agent` advertised to the hub.
fn refusing_advertise(state: &rendezvous::Shared, agent: &agent_mesh::Agent) -> String {
    state.lock().unwrap().hub.connected[&agent.identity.node_id()].address.clone()
}
