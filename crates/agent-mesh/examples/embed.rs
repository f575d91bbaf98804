//! Embedding agent-mesh in an agent: the whole replacement for the seed's `spawn_mesh_discovery`.
//!
//!     cargo run -p agent-mesh --example embed -- \
//!         --listen 0.0.0.0:3001 --advertise wss://$POD_IP:3001/crdt-sync \
//!         --rendezvous wss://rendezvous:3000/crdt-sync --rendezvous-node-id $RENDEZVOUS_NODE_ID \
//!         --assignment /etc/podinfo/annotations
//!
//! It keeps exactly the links the Pod's assignment names (never more than 4), syncs the agent's document
//! over them and over the rendezvous, writes one entry into the document, and prints its links as they change.
use std::path::PathBuf;
use std::time::Duration;

use agent_mesh::identity::Identity;
use agent_mesh::mesh::Selection;
use yrs::{Map, Transact};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The agent's identity: an Ed25519 key kept on disk; its node id is the hex public key.
    let identity = Identity::load_or_create(&PathBuf::from(arg("--key", "agent.key")))?;
    let listener = tokio::net::TcpListener::bind(arg("--listen", "127.0.0.1:3001")).await?;
    let mut config = agent_mesh::Config::new(4, arg("--advertise", "wss://127.0.0.1:3001/crdt-sync"));
    // The rendezvous is pinned: the link goes only to a server holding the key of this node id.
    let url = arg("--rendezvous", "wss://127.0.0.1:3000/crdt-sync");
    config.rendezvous = Some(agent_mesh::Pinned { url, node_id: arg("--rendezvous-node-id", "") });
    config.hostname = std::env::var("HOSTNAME").ok();
    config.join_token = std::env::var("JOIN_TOKEN").ok();
    // The assignment: the downward-API file the kubelet keeps up to date (read strictly; a bad reading
    // keeps the current links and shows up in `status.assignment_error`).
    let assignment =
        agent_mesh::source::watch_file(arg("--assignment", "annotations").into(), Duration::from_millis(500));
    let agent = agent_mesh::start(identity, listener, config, Selection::Planned(assignment));

    // The document is yours: edit it here, and the change reaches the rendezvous and every mesh link.
    let me = agent.identity.node_id();
    agent
        .doc
        .edit(move |doc| {
            let builds = doc.get_or_insert_map("builds");
            let mut txn = doc.transact_mut();
            builds.insert(&mut txn, format!("hello-from-{}", &me[..12]), "started");
            txn.encode_update_v1()
        })
        .await;

    let mut status = agent.status.clone();
    loop {
        {
            let s = status.borrow_and_update();
            let ids: Vec<&str> = s.links.iter().map(|l| &l.node_id[..12]).collect();
            println!("links: {ids:?}; assignment error: {:?}", s.assignment_error);
        }
        if status.changed().await.is_err() {
            return Ok(());
        }
    }
}
