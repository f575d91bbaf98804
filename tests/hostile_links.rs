//! Hostile bytes from a peer the plan admits, at real `mesh-agent` and `rendezvous` processes
//! (docs/design.md §3.4 rule 7): a value nested 8,000 deep, 5,000 maps nested in one another, count bombs
//! in a state vector, an update and an awareness message, types nested past the bound by levels sent
//! deepest first or beside a collected block, a flood of SyncStep1 requests against a 1 MiB document, and
//! broadcast-tree frames (made-up announcements, a graft naming one update 51,200 times, a bad id).
//! Each process lives, the
//! offending link is closed, resident memory grows by less than 64 MiB, and a legitimate update still
//! arrives. Needs only Rust: the binaries are built by the test.
#[path = "../crates/agent-mesh/tests/crafted/mod.rs"]
mod crafted;
mod support;

use std::time::Duration;

use agent_mesh::assignment::{Assignment, Peer};
use agent_mesh::handshake::{Hello, Refusal};
use agent_mesh::identity::Identity;
use agent_mesh::tls::Credentials;
use agent_mesh::tree::{self, Control};
use agent_mesh::wire::{Frame, Wire};
use agent_mesh::{downward, transport};
use crafted::{sync, var};
use support::agents::{Agent, HubProcess, Mode};
use yrs::{Map, Transact};

const GROWTH_LIMIT_KIB: u64 = 64 << 10;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is alive");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `n` maps, each inside the one before (client 1): small, but deleting the outermost recurses n deep in yrs.
fn nested_maps(n: usize) -> Vec<u8> {
    let mut u = vec![1];
    var(n, &mut u);
    u.extend([1, 0]);
    for i in 0..n {
        // A type (7) with a key (0x20), under the root "m" or the map before it, itself a map (1).
        u.push(0x27);
        if i == 0 {
            u.extend([1, 1, b'm']);
        } else {
            u.extend([0, 1]);
            var(i - 1, &mut u);
        }
        u.extend([1, b'k', 1]);
    }
    u.push(0);
    sync(2, &u)
}

/// Each bomb: what it is, and the messages it takes, in order.
fn bombs() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut depth = vec![1, 1, 1, 0, 8, 1, 1, b'm', 1];
    depth.extend(std::iter::repeat_n([117u8, 1], 8_000).flatten());
    depth.extend([126, 0]);
    vec![
        ("a value nested 8,000 deep", vec![sync(2, &depth)]),
        ("a state vector of 2^28 entries", vec![vec![0, 0, 5, 0x80, 0x80, 0x80, 0x80, 0x01]]),
        ("a state vector of 2^28 entries (7 bytes)", vec![vec![0, 0, 4, 255, 255, 255, 122]]),
        ("a client of 2^28 blocks", vec![sync(2, &[1, 0x80, 0x80, 0x80, 0x80, 0x01, 1, 0])]),
        ("an awareness update of 2^28 clients", vec![vec![1, 5, 0x80, 0x80, 0x80, 0x80, 0x01]]),
        ("5,000 maps nested in one another", vec![nested_maps(5_000)]),
        ("100 levels sent deepest first", crafted::reversed_chain(101, "r", 100)),
        ("20 levels beside a collected block, 60 deep", crafted::beside_a_collected_block(201, "g", 60, 20)),
    ]
}

/// The close code the peer ends `wire` with (None: the socket just ended).
async fn closed_with(wire: &mut Wire) -> Option<u16> {
    closed_after(wire).await.0
}

/// The close code the peer ends `wire` with, and the binary frames it sent before.
async fn closed_after(wire: &mut Wire) -> (Option<u16>, Vec<Vec<u8>>) {
    let end = async {
        let mut binary = Vec::new();
        loop {
            match wire.recv().await {
                Some(Ok(Frame::Close(code, _))) => return (Some(code), binary),
                Some(Ok(Frame::Binary(b))) => binary.push(b.to_vec()),
                Some(Ok(_)) => continue,
                _ => return (None, binary),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), end).await.expect("the link to close")
}

/// A new link from `creds` to `url`. The acceptor counts the previous link's socket until its task has
/// reported it gone, and refuses a second one from the same peer meanwhile (`duplicate`): dial again then.
async fn admitted(url: &str, id: &str, creds: &Credentials, hello: &Hello) -> Wire {
    for _ in 0..1500 {
        match transport::dial(url, creds, id, hello.clone(), None).await {
            Ok(wire) => return wire,
            Err(agent_mesh::handshake::HandshakeError::Refused(Refusal::Duplicate, _)) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the attacker is not admitted: {e}"),
        }
    }
    panic!("the attacker's previous link never went away");
}

/// Sends every bomb on a fresh link from `creds` to `url` (acceptor `id`), and checks each closes it.
async fn bomb(url: &str, id: &str, creds: &Credentials, hello: &Hello, pid: u32, base: u64) {
    for (what, messages) in bombs() {
        let mut wire = admitted(url, id, creds, hello).await;
        for m in messages {
            // The link may close before the last is sent: what closes it need not be the last.
            if wire.send(Frame::Binary(m.into())).await.is_err() {
                break;
            }
        }
        assert_eq!(closed_with(&mut wire).await, Some(Refusal::Malformed.code()), "{what}");
        let grew = rss_kib(pid).saturating_sub(base);
        eprintln!("{what}: link closed with 4002, resident memory {} KiB above the start", grew);
        assert!(grew < GROWTH_LIMIT_KIB, "{what}: resident memory grew by {grew} KiB");
    }
}

/// 5,000 SyncStep1 requests on one link whose peer never reads (each would be answered with the whole
/// document), then a malformed message: the link closing on it shows the requests before it were handled.
async fn flood(url: &str, id: &str, creds: &Credentials, hello: &Hello, pid: u32, base: u64) {
    let mut wire = admitted(url, id, creds, hello).await;
    let step1 = Frame::Binary(sync(0, &[0]).into());
    for _ in 0..5_000 {
        wire.send(step1.clone()).await.expect("the flood is read");
    }
    wire.send(Frame::Binary(vec![1, 0].into())).await.unwrap();
    assert_eq!(closed_with(&mut wire).await, Some(Refusal::Malformed.code()));
    let grew = rss_kib(pid).saturating_sub(base);
    eprintln!("5,000 SyncStep1 against a 1 MiB document: resident memory {grew} KiB above the start ({base} KiB)");
    assert!(grew < GROWTH_LIMIT_KIB, "a SyncStep1 flood: resident memory grew by {grew} KiB");
}

/// Tree frames from a peer that speaks the tree: 51,200 made-up ids announced, an update of its own
/// (which the agent keeps to answer grafts) then named 51,200 times in grafts, then an id that is not
/// 16 hex digits. The link closes on the last (so the others were handled), the update came back once.
async fn tree_bombs(url: &str, id: &str, creds: &Credentials, pid: u32, base: u64) {
    let mut wire = admitted(url, id, creds, &Hello::default()).await;
    wire.send(Frame::Text(Control::Hello.to_text())).await.unwrap();
    let body = {
        let doc = yrs::Doc::with_client_id(4242);
        let map = doc.get_or_insert_map("m");
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "tree-bomb", "v");
        txn.encode_update_v1()
    };
    let message = crafted::update(body.clone());
    wire.send(Frame::Binary(message.clone().into())).await.unwrap();
    for i in 0..200u64 {
        let ids = (0..256).map(|j| (i << 32 | j) ^ 0x5eed).collect();
        wire.send(Frame::Text(Control::IHave(ids).to_text())).await.unwrap();
    }
    let kept = tree::update_id(&body);
    for _ in 0..200 {
        wire.send(Frame::Text(Control::Graft(vec![kept; 256]).to_text())).await.unwrap();
    }
    wire.send(Frame::Text(r#"{"type":"ihave","ids":["zz"]}"#.into())).await.unwrap();
    let (code, binary) = closed_after(&mut wire).await;
    assert_eq!(code, Some(Refusal::Malformed.code()), "a tree frame with a bad id");
    assert_eq!(binary.iter().filter(|b| **b == message).count(), 1, "the update is resent once");
    let grew = rss_kib(pid).saturating_sub(base);
    eprintln!("tree frames: link closed with 4002, resident memory {grew} KiB above the start");
    assert!(grew < GROWTH_LIMIT_KIB, "tree frames: resident memory grew by {grew} KiB");
}

fn assign(agent: &Agent, dial: &[&Agent], accept: &[String]) {
    let peers = dial
        .iter()
        .map(|d| Peer { node_id: d.node_id.clone().into(), url: format!("wss://{}/crdt-sync", d.mesh).into() });
    let a = Assignment::new(peers.collect(), accept.iter().map(|id| id.into()), "p".into());
    let map = a.to_annotations().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    std::fs::write(&agent.annotations, downward::render(&map)).unwrap();
}

async fn arrives(agent: &Agent, key: &str) {
    for _ in 0..1500 {
        if agent.updates().await.is_some_and(|u| u.contains(key)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key} never reached {}", agent.name);
}

#[tokio::test]
async fn hostile_messages_cost_their_link_and_neither_agent_nor_hub_more() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start().await;
    let victim = Agent::spawn(dir.path(), "victim", "127.0.0.1", &hub.sync, Mode::Operator, 4).await;
    let friend = Agent::spawn(dir.path(), "friend", "127.0.0.1", &hub.sync, Mode::Operator, 4).await;
    let attacker = Identity::generate();
    let creds = Credentials::new(&attacker);
    assign(&victim, &[], &[friend.node_id.clone(), attacker.node_id()]);
    assign(&friend, &[&victim], &[]);
    for _ in 0..1500 {
        if victim.links().await.is_some_and(|l| l.contains(&friend.node_id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A 1 MiB document, so that every SyncStep1 answered would cost a megabyte.
    let big = friend.append_value(&"d".repeat(1 << 20)).await;
    arrives(&victim, &big).await;

    let url = format!("wss://{}/crdt-sync", victim.mesh);
    let base = rss_kib(victim.pid());
    bomb(&url, &victim.node_id, &creds, &Hello::default(), victim.pid(), base).await;
    flood(&url, &victim.node_id, &creds, &Hello::default(), victim.pid(), base).await;
    tree_bombs(&url, &victim.node_id, &creds, victim.pid(), base).await;

    let hub_pid = hub.child.id().unwrap();
    let hub_base = rss_kib(hub_pid);
    let hello = Hello { address: Some("wss://127.0.0.1:9/crdt-sync".into()), ..Hello::default() };
    bomb(&hub.sync.url, &hub.sync.node_id, &creds, &hello, hub_pid, hub_base).await;
    flood(&hub.sync.url, &hub.sync.node_id, &creds, &hello, hub_pid, hub_base).await;

    // Both still serve, and a legitimate update still crosses the mesh link.
    let key = friend.append().await;
    arrives(&victim, &key).await;
    assert!(victim.metric("agentmesh_protocol_errors_total", "").await >= 10.0);
    assert!(victim.metric("agentmesh_sync_requests_dropped_total", "").await >= 1.0);
    assert!(rss_kib(victim.pid()) > 0 && rss_kib(hub_pid) > 0);
}
