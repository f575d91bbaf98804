//! A rolling upgrade from agents before TLS (link protocol 1) to TLS agents (protocol 2), one agent
//! replaced at a time as Pods are in a rollout. At every step each planned link forms and carries the
//! document; an agent of protocol 1 links in 1, two new agents link in 2 (neither dials plain to a peer that
//! speaks TLS), and once the upgrade mode is turned off only protocol 2 is spoken.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_mesh::assignment::{Assignment, Peer};
use agent_mesh::identity::Identity;
use agent_mesh::mesh::Selection;
use agent_mesh::transport::Protocols;
use agent_mesh::{Agent, Config, downward};
use yrs::{Map, Transact};

struct Node {
    agent: Agent,
    url: String,
    file: PathBuf,
}

impl Node {
    fn id(&self) -> String {
        self.agent.identity.node_id()
    }
}

async fn node(dir: &Path, name: &str, protocols: Protocols) -> Node {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = protocols.advertise(listener.local_addr().unwrap());
    let mut config = Config::new(2, url.clone());
    config.protocols = protocols;
    // Agents before TLS require the token on every link; new ones send it to them as they did.
    config.join_token = Some("fleet-token".into());
    let file = dir.join(name);
    let source = agent_mesh::source::watch_file(file.clone(), Duration::from_millis(20));
    let agent = agent_mesh::start(Identity::generate(), listener, config, Selection::Planned(source));
    Node { agent, url, file }
}

/// Plans the ring `ring[0] → ring[1] → … → ring[0]` (each dials the next), as the operator would, and
/// plans nothing for `gone`.
fn plan_ring(ring: &[&Node], gone: &[&Node]) {
    for (i, n) in ring.iter().enumerate() {
        let next = ring[(i + 1) % ring.len()];
        let prev = ring[(i + ring.len() - 1) % ring.len()];
        let a = Assignment::new(
            vec![Peer { node_id: next.id().into(), url: next.url.clone().into() }],
            [prev.id().into()],
            "p".into(),
        );
        let map = a.to_annotations().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        std::fs::write(&n.file, downward::render(&map)).unwrap();
    }
    for n in gone {
        std::fs::write(&n.file, downward::render(&BTreeMap::new())).unwrap();
    }
}

/// Waits until every node of the ring holds exactly its two ring links, each in the protocol `protocol`
/// says for that pair; fails naming what it saw.
async fn ring_holds(ring: &[&Node], protocol: impl Fn(&Node, &Node) -> u8) {
    let want = |i: usize| {
        let n = ring.len();
        let mut w = BTreeMap::new();
        for j in [(i + 1) % n, (i + n - 1) % n] {
            w.insert(ring[j].id(), protocol(ring[i], ring[j]));
        }
        w
    };
    for _ in 0..1500 {
        let held: Vec<BTreeMap<String, u8>> = ring
            .iter()
            .map(|n| n.agent.status.borrow().links.iter().map(|l| (l.node_id.clone(), l.protocol)).collect())
            .collect();
        if (0..ring.len()).all(|i| held[i] == want(i)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen: Vec<_> = ring.iter().map(|n| n.agent.status.borrow().links.clone()).collect();
    panic!("the ring never held its links in the expected protocols: {seen:?}");
}

async fn crosses(from: &Node, to: &Node, key: &'static str) {
    from.agent
        .doc
        .edit(move |d| {
            let m = d.get_or_insert_map("m");
            let mut txn = d.transact_mut();
            m.insert(&mut txn, key, "v");
            txn.encode_update_v1()
        })
        .await;
    for _ in 0..1500 {
        if to.agent.doc.read(move |d| d.get_or_insert_map("m").get(&d.transact(), key).is_some()).await == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key} never crossed");
}

/// Protocol 2 between two agents that both speak it, else 1.
fn negotiated(protocols: &BTreeMap<String, Protocols>) -> impl Fn(&Node, &Node) -> u8 + '_ {
    |a, b| if protocols[&a.id()].v2 && protocols[&b.id()].v2 { 2 } else { 1 }
}

#[tokio::test]
async fn a_fleet_upgrades_to_tls_one_agent_at_a_time_and_keeps_its_links() {
    let dir = tempfile::tempdir().unwrap();
    let mut speaks = BTreeMap::new();
    let mut spawn = async |name: &str, p: Protocols| {
        let n = node(dir.path(), name, p).await;
        speaks.insert(n.id(), p);
        n
    };
    // The fleet before TLS.
    let (a, b, c) = (spawn("a", Protocols::V1).await, spawn("b", Protocols::V1).await, spawn("c", Protocols::V1).await);
    // Upgrade: each agent replaced by one that speaks both and advertises ws:// as before.
    let c2 = spawn("c2", Protocols::UPGRADE).await;
    let b2 = spawn("b2", Protocols::UPGRADE).await;
    let a2 = spawn("a2", Protocols::UPGRADE).await;
    // Then the upgrade mode is turned off, one agent at a time: protocol 2 alone, wss:// advertised.
    let a3 = spawn("a3", Protocols::V2).await;
    let b3 = spawn("b3", Protocols::V2).await;
    let c3 = spawn("c3", Protocols::V2).await;
    let protocol = negotiated(&speaks);

    plan_ring(&[&a, &b, &c], &[]);
    ring_holds(&[&a, &b, &c], &protocol).await;
    crosses(&a, &c, "before").await;
    let steps: [(&[&Node], &[&Node]); 6] = [
        (&[&a, &b, &c2], &[&c]),
        (&[&a, &b2, &c2], &[&b]),
        (&[&a2, &b2, &c2], &[&a]),
        (&[&a3, &b2, &c2], &[&a2]),
        (&[&a3, &b3, &c2], &[&b2]),
        (&[&a3, &b3, &c3], &[&c2]),
    ];
    for (i, (ring, gone)) in steps.iter().enumerate() {
        plan_ring(ring, gone);
        ring_holds(ring, &protocol).await;
        let key: &'static str = ["s1", "s2", "s3", "s4", "s5", "s6"][i];
        crosses(ring[0], ring[2], key).await;
    }
    // Agents that never spoke anything but 2 held only protocol-2 links.
    for n in [&a3, &b3, &c3] {
        assert!(n.agent.status.borrow().links.iter().all(|l| l.protocol == 2));
    }
}
