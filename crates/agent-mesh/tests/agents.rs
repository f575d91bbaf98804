//! Agents in process, over real links (WebSocket in mutual TLS) on loopback: the planned links form and
//! carry the document, a plan change closes before it dials and keeps a link whose direction flipped, an
//! unplanned dialer is refused, and a malformed assignment file keeps the current links.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_mesh::assignment::{Assignment, Peer};
use agent_mesh::identity::Identity;
use agent_mesh::mesh::Selection;
use agent_mesh::{Agent, Config, downward};
use yrs::{Map, Transact};

struct Node {
    agent: Agent,
    url: String,
    file: PathBuf,
}

async fn node(dir: &Path, name: &str, token: Option<&str>) -> Node {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("wss://{}/crdt-sync", listener.local_addr().unwrap());
    let mut config = Config::new(2, url.clone());
    config.join_token = token.map(str::to_string);
    let file = dir.join(name);
    let source = agent_mesh::source::watch_file(file.clone(), Duration::from_millis(20));
    let agent = agent_mesh::start(Identity::generate(), listener, config, Selection::Planned(source));
    Node { agent, url, file }
}

fn id(n: &Node) -> String {
    n.agent.identity.node_id()
}

/// Writes `n`'s assignment file: dial `dial`, accept `accept`.
fn assign(n: &Node, dial: &[&Node], accept: &[&Node]) {
    let peers = dial.iter().map(|d| Peer { node_id: id(d).into(), url: d.url.clone().into() }).collect();
    let a = Assignment::new(peers, accept.iter().map(|a| id(a).into()), "p".into());
    let map = a.to_annotations().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    std::fs::write(&n.file, downward::render(&map)).unwrap();
}

async fn links(n: &Node, want: &[&Node]) {
    let want: BTreeSet<String> = want.iter().map(|w| id(w)).collect();
    let mut status = n.agent.status.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.links.iter().map(|l| l.node_id.clone()).collect::<BTreeSet<_>>() == want),
    )
    .await
    .unwrap_or_else(|_| panic!("links of {} never became {want:?}: {:?}", id(n), n.agent.status.borrow()))
    .unwrap();
}

async fn put(n: &Node, key: &'static str) {
    n.agent
        .doc
        .edit(move |d| {
            let m = d.get_or_insert_map("m");
            let mut txn = d.transact_mut();
            m.insert(&mut txn, key, "v");
            txn.encode_update_v1()
        })
        .await;
}

async fn has(n: &Node, key: &'static str) {
    for _ in 0..300 {
        let found = n.agent.doc.read(move |d| d.get_or_insert_map("m").get(&d.transact(), key).is_some()).await;
        if found == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key} never reached {}", id(n));
}

#[tokio::test]
async fn planned_links_form_carry_the_document_and_follow_a_new_plan() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) =
        (node(dir.path(), "a", None).await, node(dir.path(), "b", None).await, node(dir.path(), "c", None).await);
    // a dials b, b dials c: a chain.
    assign(&a, &[&b], &[]);
    assign(&b, &[&c], &[&a]);
    assign(&c, &[], &[&b]);
    links(&a, &[&b]).await;
    links(&b, &[&a, &c]).await;
    put(&a, "one").await;
    has(&c, "one").await;
    // New plan: b – a flips direction (a accepts b), a – c is new, b – c goes.
    assign(&b, &[&a], &[]);
    assign(&a, &[], &[&b, &c]);
    assign(&c, &[&a], &[]);
    links(&c, &[&a]).await;
    links(&a, &[&b, &c]).await;
    links(&b, &[&a]).await;
    assert_eq!(b.agent.metrics.links_dialed.get(), 1, "the flipped link was kept, not redialed");
    put(&b, "two").await;
    has(&c, "two").await;
}

#[tokio::test]
async fn strangers_are_refused_and_a_bad_file_keeps_the_links() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a", Some("secret")).await;
    let b = node(dir.path(), "b", Some("secret")).await;
    let stranger = node(dir.path(), "s", Some("secret")).await;
    assign(&a, &[], &[&b]);
    assign(&b, &[&a], &[]);
    links(&a, &[&b]).await;
    // Planned by nobody: refused as not planned, though it has the token (the plan is the authority).
    assign(&stranger, &[&a], &[]);
    let refused = |r: &'static str| a.agent.metrics.links_refused.get_or_create(&vec![("reason", r)]).get();
    for _ in 0..500 {
        if refused("not_planned") >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused("not_planned") >= 1, "the stranger was not refused");
    links(&a, &[&b]).await;
    // A half-written file: reported, never applied.
    let text = std::fs::read_to_string(&a.file).unwrap();
    std::fs::write(&a.file, &text[..text.len() - 3]).unwrap();
    let mut status = a.agent.status.clone();
    tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.assignment_error.is_some()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.agent.status.borrow().links.len(), 1, "the links stayed");
    assert!(a.agent.metrics.assignment_errors.get() >= 1);
}
