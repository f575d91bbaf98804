//! The rendezvous simulator's admin API, driven over HTTP as the demo drives it, and its https mode read
//! by the presence client with and without the right `caBundle`.
mod support;

use std::time::Duration;

use mesh_operator::presence::{Fetched, Fetcher, Request, Snapshot};
use rendezvous::{new_state, now_ms, serve, tls_config};
use serde_json::{Value, json};

async fn start(tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(serve(listener, new_state(agent_mesh::identity::Identity::generate(), Some("rv")), tls));
    format!("{scheme}://{addr}")
}

fn request<'a>(url: &'a str, ca_bundle: Option<&'a str>) -> Request<'a> {
    Request { url, token: None, ca_bundle, timeout: Duration::from_secs(3), etag: None, wait: None }
}

async fn snapshot(fetcher: &Fetcher, url: &str, token: Option<&str>) -> Snapshot {
    let req = Request { token, ..request(url, None) };
    match fetcher.fetch(&req).await {
        Ok(Fetched::New { snapshot, .. }) => snapshot,
        Ok(Fetched::NotModified { .. }) => panic!("no ETag was sent"),
        Err(e) => panic!("presence from {url}: {e}"),
    }
}

#[tokio::test]
async fn admin_api_changes_what_presence_reports() {
    let base = start(None).await;
    mesh_operator::presence::install_crypto_provider();
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{base}{path}")).header("content-type", "application/json").body(body.to_string()).send()
    };
    for id in ["a1", "a2", "a3"] {
        let agent = json!({"nodeId": id, "address": "ws://0.0.0.0:3001/crdt-sync", "hostname": format!("pod-{id}")});
        assert_eq!(post("/admin/agents", agent).await.unwrap().status(), 204);
    }
    assert_eq!(post("/admin/agents/a1/zone", json!({"zone": "zone-b"})).await.unwrap().status(), 204);
    assert_eq!(post("/admin/agents/a2/kill", json!({})).await.unwrap().status(), 204);
    assert_eq!(post("/admin/agents/a3/stop-heartbeat", json!({})).await.unwrap().status(), 204);
    assert_eq!(post("/admin/agents/nobody/kill", json!({})).await.unwrap().status(), 404);

    let fetcher = Fetcher::new(1 << 20);
    let presence = format!("{base}/presence");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let snap = snapshot(&fetcher, &presence, None).await;
    assert_eq!(snap.server_node_id.as_deref(), Some("rv"));
    let by_id = |id: &str| snap.nodes.iter().find(|n| &*n.node_id == id).unwrap().clone();
    let (a1, a2, a3) = (by_id("a1"), by_id("a2"), by_id("a3"));
    assert!(a1.alive && !a2.alive && a3.alive);
    assert_eq!(a1.hostname.as_deref(), Some("pod-a1"));
    let now = snap.now_ms.unwrap();
    assert!(now - a1.heartbeat_ms().unwrap() < 100.0, "a1 heartbeats");
    assert!(now - a3.heartbeat_ms().unwrap() >= 1000.0, "a3's heartbeat stopped");
    let raw: Value = serde_json::from_str(&http.get(&presence).send().await.unwrap().text().await.unwrap()).unwrap();
    let zone = raw["nodes"].as_array().unwrap().iter().find(|n| n["node_id"] == "a1").unwrap()["zone"].clone();
    assert_eq!(zone, "zone-b");

    // A required token, then failures on purpose.
    post("/admin/token", json!({"token": "t0k"})).await.unwrap();
    assert_eq!(fetcher.fetch(&request(&presence, None)).await.err().unwrap().reason(), "Unauthorized");
    assert_eq!(snapshot(&fetcher, &presence, Some("t0k")).await.nodes.len(), 3);
    post("/admin/token", json!({"token": null})).await.unwrap();
    for (mode, reason) in [("status500", "HTTPStatus"), ("garbage", "MalformedBody"), ("oversized", "BodyTooLarge")] {
        assert_eq!(post("/admin/fail", json!({"mode": mode})).await.unwrap().status(), 204);
        assert_eq!(fetcher.fetch(&request(&presence, None)).await.err().unwrap().reason(), reason, "{mode}");
    }
    post("/admin/fail", json!({"mode": "hang"})).await.unwrap();
    let hang = Request { timeout: Duration::from_millis(300), ..request(&presence, None) };
    assert_eq!(fetcher.fetch(&hang).await.err().unwrap().reason(), "Timeout");
    post("/admin/fail", json!({"mode": "none"})).await.unwrap();
    assert_eq!(http.delete(format!("{base}/admin/agents/a2")).send().await.unwrap().status(), 204);
    assert_eq!(snapshot(&fetcher, &presence, None).await.nodes.len(), 2);
}

#[tokio::test]
async fn https_presence_needs_the_right_ca_bundle() {
    let (ca, cert, key) = support::test_ca();
    let base = start(Some(tls_config(cert.as_bytes(), key.as_bytes()).unwrap())).await;
    let presence = format!("{base}/presence");
    let fetcher = Fetcher::new(1 << 20);
    assert!(matches!(fetcher.fetch(&request(&presence, Some(&ca))).await, Ok(Fetched::New { .. })));

    let (other_ca, _, _) = support::test_ca();
    let wrong = fetcher.fetch(&request(&presence, Some(&other_ca))).await.err().expect("an untrusted certificate");
    assert_eq!(wrong.reason(), "ConnectionFailed", "{wrong}");
    assert!(wrong.to_string().to_lowercase().contains("certificate"), "{wrong}");
    let no_bundle = fetcher.fetch(&request(&presence, None)).await.err().expect("no trust for a private CA");
    assert!(no_bundle.to_string().to_lowercase().contains("certificate"), "{no_bundle}");
    // A server certificate is not a key, and a key is not a certificate.
    assert!(tls_config(key.as_bytes(), key.as_bytes()).unwrap_err().contains("certificate"));
    assert!(tls_config(cert.as_bytes(), cert.as_bytes()).unwrap_err().contains("key"));
}

/// A long poll (`Prefer: wait`) is held while the list is unchanged and answered as soon as an agent
/// joins, saying it honoured the wait; a request without the preference is answered at once.
#[tokio::test]
async fn a_long_poll_is_held_until_the_list_changes() {
    let base = start(None).await;
    mesh_operator::presence::install_crypto_provider();
    let http = reqwest::Client::new();
    let (fetcher, presence) = (Fetcher::new(1 << 20), format!("{base}/presence"));
    let Ok(Fetched::New { etag: Some(etag), waits: false, .. }) = fetcher.fetch(&request(&presence, None)).await else {
        panic!("a first answer with an ETag, and no wait asked for");
    };
    let state = || async {
        let body = http.get(format!("{base}/admin/state")).send().await.unwrap().text().await.unwrap();
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let held = {
        let (fetcher, presence, etag) = (Fetcher::new(1 << 20), presence.clone(), etag.clone());
        tokio::spawn(async move {
            let req = Request { etag: Some(&etag), wait: Some(Duration::from_secs(60)), ..request(&presence, None) };
            fetcher.fetch(&req).await
        })
    };
    while state().await["held"] != 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!held.is_finished(), "answered with nothing changed");
    // A frozen heartbeat: the body then stays the same between reads.
    let agent = json!({"nodeId": "a1", "address": "ws://0.0.0.0:3001/crdt-sync", "frozenAtMs": now_ms()});
    let add = http.post(format!("{base}/admin/agents")).header("content-type", "application/json");
    add.body(agent.to_string()).send().await.unwrap();
    match held.await.unwrap() {
        Ok(Fetched::New { snapshot, waits: true, .. }) => assert_eq!(&*snapshot.nodes[0].node_id, "a1"),
        _ => panic!("the held read answered with the new agent, honouring the wait"),
    }
    assert_eq!(state().await["released"], 1);
    // Nothing changed since: a short wait ends in 304, still honoured.
    let req = Request { etag: Some(&etag), wait: Some(Duration::from_secs(1)), ..request(&presence, None) };
    let Ok(Fetched::New { etag: Some(now), .. }) = fetcher.fetch(&req).await else { panic!("the list changed") };
    let req = Request { etag: Some(&now), wait: Some(Duration::from_secs(1)), ..request(&presence, None) };
    assert!(matches!(fetcher.fetch(&req).await, Ok(Fetched::NotModified { waits: true })));
    assert_eq!(state().await["held"], 2);
    // A request without the token is refused before it could be held.
    let token = http.post(format!("{base}/admin/token")).header("content-type", "application/json");
    token.body(json!({"token": "s3cret"}).to_string()).send().await.unwrap();
    let req = Request { etag: Some(&now), wait: Some(Duration::from_secs(60)), ..request(&presence, None) };
    assert_eq!(fetcher.fetch(&req).await.err().map(|e| e.reason()), Some("Unauthorized"));
    assert_eq!(state().await["held"], 2, "held without the token");
}
