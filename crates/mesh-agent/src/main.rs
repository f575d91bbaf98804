//! `mesh-agent`: a real agent on the agent-mesh library. It keeps an Ed25519 identity on disk, syncs a Yjs
//! document with the rendezvous and over its mesh links, and serves `/metrics` and a small test API (see
//! `api.rs`). `--peer-selection seed` runs the seed's own peer choice instead of the operator's plan, for
//! side-by-side measurements.
mod api;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agent_mesh::identity::Identity;
use agent_mesh::mesh::Selection;
use anyhow::Context;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PeerSelection {
    /// Dial exactly the peers of the Pod's assignment, accept exactly its `accepts`, hold the cap.
    Operator,
    /// The seed's scheme: the first `max-peers` alive peers of the presence list, rescanned every
    /// `seed-scan` after `seed-delay`, accepting everyone.
    Seed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AssignmentSource {
    /// The downward-API annotations file (`--assignment-file`).
    File,
    /// A watch of the agent's own Pod (`--pod-name`, `--pod-namespace`; in-cluster credentials or
    /// $KUBECONFIG; needs get/list/watch on pods).
    Pod,
}

#[derive(Parser, Debug)]
#[command(about = "A build agent's sync side: a CRDT document over the rendezvous and the planned mesh links")]
struct Args {
    /// Where mesh links are accepted.
    #[arg(long, default_value = "0.0.0.0:3001")]
    listen: SocketAddr,
    /// The URL other agents dial (default: wss://LISTEN/crdt-sync; ws://LISTEN/crdt-sync?link=2 during an
    /// upgrade).
    #[arg(long)]
    advertise: Option<String>,
    /// Where /metrics and /healthz are served (read-only).
    #[arg(long, default_value = "0.0.0.0:9464")]
    metrics: SocketAddr,
    /// Where the test API is served (`/status`, and `/updates`, which writes to the document); off
    /// unless given. Bind it to a loopback address: anyone who reaches it can write.
    #[arg(long)]
    test_api: Option<SocketAddr>,
    /// The Ed25519 secret key (created on first start).
    #[arg(long, default_value = "agent.key")]
    identity: PathBuf,
    /// The rendezvous' wss://…/crdt-sync URL.
    #[arg(long, requires = "rendezvous_node_id")]
    rendezvous: Option<String>,
    /// The rendezvous' node id (its key's hex): the link goes only to a server with that key.
    #[arg(long, env = "RENDEZVOUS_NODE_ID", requires = "rendezvous", value_parser = node_id)]
    rendezvous_node_id: Option<String>,
    /// A file holding the join token. It is never sent: links carry a proof of it bound to their TLS
    /// connection.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Announced to the rendezvous (default: $HOSTNAME); the operator matches it to the Pod's name.
    #[arg(long, env = "HOSTNAME")]
    hostname: Option<String>,
    /// The most mesh links at once.
    #[arg(long, default_value_t = 4)]
    max_peers: usize,
    #[arg(long, value_enum, default_value_t = PeerSelection::Operator)]
    peer_selection: PeerSelection,
    /// Where the assignment is read (operator mode).
    #[arg(long, value_enum, default_value_t = AssignmentSource::File)]
    assignment_source: AssignmentSource,
    /// The downward-API annotations file.
    #[arg(long, default_value = "/etc/podinfo/annotations")]
    assignment_file: PathBuf,
    /// This agent's Pod (for `--assignment-source pod`).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// How often the assignment file is read.
    #[arg(long, value_parser = duration, default_value = "200ms")]
    poll_interval: Duration,
    #[arg(long, value_parser = duration, default_value = "10s")]
    seed_delay: Duration,
    #[arg(long, value_parser = duration, default_value = "60s")]
    seed_scan: Duration,
    /// Link protocols: `2` (mutual TLS); `1,2` while a fleet upgrades from agents before TLS (it also speaks
    /// their plaintext protocol 1 and advertises ws:// so they can dial it); `1` is what those agents did.
    #[arg(long, default_value = "2", value_parser = agent_mesh::transport::Protocols::parse)]
    link_protocols: agent_mesh::transport::Protocols,
    /// How often each link says it is alive (100ms to 5s: peers close a link silent for 20 s).
    #[arg(long, value_parser = heartbeat, default_value = "5s")]
    heartbeat: Duration,
    /// A planned peer every dial to which fails for this long (1s to 1h) is reported to the rendezvous as
    /// unreachable, so the operator plans around the pair.
    #[arg(long, value_parser = grace, default_value = "30s")]
    unreachable_after: Duration,
    /// A planned peer without a link for this long (1s to 1h) under one plan is lost: the agent dials the
    /// assignment's standby for it, into the slot it left, until it is back or a new plan arrives.
    #[arg(long, value_parser = grace, default_value = "3s")]
    standby_after: Duration,
    /// How updates cross mesh links: `tree` (each update whole over a spanning tree of the links, its id
    /// over the others) or `flood` (whole over every link, as agents before the tree did).
    #[arg(long, default_value = "tree", value_parser = agent_mesh::tree::Broadcast::parse)]
    broadcast: agent_mesh::tree::Broadcast,
    /// With the tree: how long an update announced by id may take to arrive whole before it is asked for
    /// (5ms to 10s). Shorter repairs a broken branch sooner, and sends more copies when the tree is slow.
    #[arg(long, value_parser = graft_after, default_value = "150ms")]
    graft_after: Duration,
}

/// `250ms`, `10s` or `2m`.
fn duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number followed by ms, s or m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

fn node_id(s: &str) -> Result<String, String> {
    if agent_mesh::identity::is_node_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a node id (64 lowercase hex digits)"))
    }
}

/// A duration within `lo..=hi`.
fn within(s: &str, lo: Duration, hi: Duration) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < lo || d > hi {
        return Err(format!("{s:?} is outside {lo:?}..={hi:?}"));
    }
    Ok(d)
}

fn grace(s: &str) -> Result<Duration, String> {
    within(s, Duration::from_secs(1), Duration::from_secs(3600))
}

fn heartbeat(s: &str) -> Result<Duration, String> {
    within(s, agent_mesh::transport::MIN_HEARTBEAT, agent_mesh::transport::MAX_HEARTBEAT)
}

fn graft_after(s: &str) -> Result<Duration, String> {
    within(s, Duration::from_millis(5), Duration::from_secs(10))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let identity = Identity::load_or_create(&args.identity)?;
    let token = match &args.join_token_file {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("--join-token-file {}", p.display()))?),
        None => None,
    };
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("--listen {}", args.listen))?;
    let mesh_addr = listener.local_addr()?;
    let mut config = agent_mesh::Config::new(
        args.max_peers,
        match args.advertise {
            Some(url) => args.link_protocols.mark(url),
            None => args.link_protocols.advertise(mesh_addr),
        },
    );
    config.hostname = args.hostname;
    config.rendezvous =
        args.rendezvous.zip(args.rendezvous_node_id).map(|(url, node_id)| agent_mesh::Pinned { url, node_id });
    config.join_token = token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
    config.heartbeat = args.heartbeat;
    config.protocols = args.link_protocols;
    config.unreachable_after = args.unreachable_after;
    config.standby_after = args.standby_after;
    config.broadcast = match args.broadcast {
        agent_mesh::tree::Broadcast::Tree { .. } => agent_mesh::tree::Broadcast::Tree { graft_after: args.graft_after },
        flood => flood,
    };
    // Dialed from the address links are accepted on, when it is one: rules by address see one address.
    config.dial_from = Some(mesh_addr.ip()).filter(|ip| !ip.is_unspecified());
    let selection = match args.peer_selection {
        PeerSelection::Operator => {
            Selection::Planned(agent_mesh::source::watch_file(args.assignment_file, args.poll_interval))
        }
        PeerSelection::Seed => Selection::Seed { delay: args.seed_delay, scan: args.seed_scan },
    };
    let agent = agent_mesh::start(identity, listener, config, selection);
    let node_id = agent.identity.node_id();
    let bind = |flag: &'static str, addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--{flag} {addr}"))
    };
    let metrics = bind("metrics", args.metrics).await?;
    let test_api = match args.test_api {
        Some(addr) => Some(bind("test-api", addr).await?),
        None => None,
    };
    let test_addr = test_api.as_ref().map(|l| l.local_addr()).transpose()?;
    let shown = test_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    println!("listening mesh={mesh_addr} metrics={} test-api={shown} node={node_id}", metrics.local_addr()?);
    // A mesh task that ended (it never does, unless it failed) leaves links unmanaged: exit, so whatever
    // runs the agent restarts it, rather than serve a status that no longer moves.
    let mut status = agent.status.clone();
    let mesh_ended = async move { while status.changed().await.is_ok() {} };
    let serve_metrics = axum::serve(metrics, api::metrics_router(&agent)).into_future();
    let serve = async {
        match test_api {
            Some(listener) => {
                let serve_tests = axum::serve(listener, api::test_router(agent).await).into_future();
                tokio::try_join!(serve_metrics, serve_tests).map(drop)
            }
            None => serve_metrics.await,
        }
    };
    tokio::select! {
        served = serve => served?,
        () = mesh_ended => anyhow::bail!("the mesh task stopped; see the error above"),
    }
    Ok(())
}
