//! The agent side of mesh-operator. An agent embeds this crate to keep exactly the supplementary sync links
//! its Pod's assignment names, and no more than its cap, whatever order and delay assignments arrive in.
//!
//! Without default features the crate is only the formats the operator shares: the assignment
//! ([`assignment`], [`downward`]) and the link health report ([`health`]). With `runtime` (the default) it
//! is the whole agent side:
//! [`identity`] (Ed25519, node id = hex public key) → [`source`] (the assignment, read strictly) →
//! [`links`] (the pure link table and its invariants) → [`mesh`] (the task that dials, admits and evicts)
//! over [`transport`], [`tls`] and [`handshake`] (WebSocket links inside mutual TLS, each end its node key)
//! → [`screen`] (what a peer may send) → [`nesting`] and [`held`] (how deep types nest, and updates
//! that wait for what they build on) → [`doc`] (the Yjs document and its relay) with [`tree`] (the
//! broadcast tree over the mesh links). [`rendezvous`] is the primary channel,
//! which also carries [`health`] (planned peers this agent cannot reach); [`presence`] the seed baseline's
//! peer choice.
pub mod assignment;
pub mod downward;
pub mod health;

#[cfg(feature = "runtime")]
pub mod doc;
#[cfg(feature = "runtime")]
pub mod handshake;
#[cfg(feature = "runtime")]
pub mod held;
#[cfg(feature = "runtime")]
pub mod identity;
#[cfg(feature = "runtime")]
mod legacy;
#[cfg(feature = "runtime")]
pub mod links;
#[cfg(feature = "runtime")]
pub mod mesh;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod nesting;
#[cfg(feature = "runtime")]
pub mod presence;
#[cfg(feature = "runtime")]
mod rendezvous;
#[cfg(feature = "runtime")]
pub mod screen;
#[cfg(feature = "runtime")]
pub mod source;
#[cfg(feature = "runtime")]
pub mod tls;
#[cfg(feature = "runtime")]
pub mod transport;
#[cfg(feature = "runtime")]
pub mod tree;
#[cfg(feature = "runtime")]
pub mod wire;

#[cfg(feature = "runtime")]
pub use runtime::*;

#[cfg(feature = "runtime")]
mod runtime {
    use std::net::IpAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use crate::doc::Doc;
    use crate::identity::Identity;
    use crate::mesh::{Backoff, Mesh, Selection, Status};
    use crate::metrics::Metrics;
    use crate::tls::Credentials;
    use crate::transport::Protocols;

    /// How an agent runs its links.
    #[derive(Clone, Debug)]
    pub struct Config {
        /// The most mesh links this agent holds at once (the seed's `max_mesh_peers`).
        pub cap: usize,
        /// The URL other agents dial to reach this one (announced to the rendezvous).
        pub advertise: String,
        /// Announced to the rendezvous; the operator matches it to the Pod name.
        pub hostname: Option<String>,
        /// The rendezvous, if any.
        pub rendezvous: Option<Pinned>,
        /// The fleet's join token. It never leaves the agent: the rendezvous link (and, in seed mode, every
        /// link) carries a proof bound to its TLS connection instead, and seed-mode acceptors require one.
        pub join_token: Option<String>,
        pub backoff: Backoff,
        /// How often each link says it is alive; kept between 100 ms and 5 s (peers close a link silent for
        /// 20 s).
        pub heartbeat: Duration,
        /// The link protocols spoken: 2 alone, but for an upgrade from agents before TLS.
        pub protocols: Protocols,
        /// The local address links are dialed from (the system's choice when `None`).
        pub dial_from: Option<IpAddr>,
        /// A planned peer every dial to which has failed for this long is reported unreachable.
        pub unreachable_after: Duration,
        /// A planned peer without a link for this long under one plan is lost: a standby may take its slot.
        pub standby_after: Duration,
        /// How updates cross the mesh links.
        pub broadcast: crate::tree::Broadcast,
    }

    /// A server reached by URL whose node key is known in advance.
    #[derive(Clone, Debug)]
    pub struct Pinned {
        /// `wss://…/crdt-sync`.
        pub url: String,
        /// The node id its TLS key must have; nothing is sent to a server with another key.
        pub node_id: String,
    }

    impl Config {
        pub fn new(cap: usize, advertise: String) -> Self {
            Config {
                cap,
                advertise,
                hostname: None,
                rendezvous: None,
                join_token: None,
                backoff: Backoff { base: Duration::from_millis(200), max: Duration::from_secs(5) },
                heartbeat: Duration::from_secs(5),
                protocols: Protocols::V2,
                dial_from: None,
                unreachable_after: Duration::from_secs(30),
                standby_after: Duration::from_secs(3),
                broadcast: crate::tree::Broadcast::default(),
            }
        }
    }

    /// A running agent.
    pub struct Agent {
        pub identity: Arc<Identity>,
        /// The shared document: edit and read it here; every change reaches the rendezvous and the mesh.
        pub doc: Doc,
        pub metrics: Metrics,
        pub status: watch::Receiver<Status>,
    }

    /// Starts an agent: its document, the mesh links (inbound on `listener`), and the rendezvous link.
    pub fn start(identity: Identity, listener: TcpListener, config: Config, selection: Selection) -> Agent {
        let creds = Arc::new(Credentials::new(&identity));
        let identity = Arc::new(identity);
        let metrics = Metrics::default();
        let doc = Doc::spawn_with(metrics.doc.clone(), config.broadcast);
        let config = Arc::new(config);
        let (mesh_doc, mesh_metrics) = (doc.clone(), metrics.clone());
        let status =
            Mesh::spawn(identity.clone(), creds.clone(), mesh_doc, mesh_metrics, config.clone(), listener, selection);
        if let Some(hub) = config.rendezvous.clone() {
            let reports = crate::rendezvous::reports(status.clone());
            tokio::spawn(crate::rendezvous::run(creds, doc.clone(), metrics.clone(), config, hub, reports));
        }
        Agent { identity, doc, metrics, status }
    }
}
