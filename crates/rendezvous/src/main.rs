//! `rendezvous`: the sync hub and presence API (see the library's docs for the admin API). Prints
//! `listening on ADDR node=ID` once it accepts connections (agents pin ID).
use clap::Parser;

#[derive(Parser)]
#[command(about = "Rendezvous: a Yjs sync hub for agents, the presence API, simulated agents and failure modes")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// The node id reported as `serverNodeId` (default: the hub's own).
    #[arg(long)]
    server_node_id: Option<String>,
    /// The hub's Ed25519 node key (created on first start; agents pin its node id). Without it the hub
    /// makes a new key at every start.
    #[arg(long)]
    identity: Option<std::path::PathBuf>,
    /// Serve https with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Link protocols spoken with agents: `2`, or `1,2` while agents from before TLS (protocol 1, plaintext
    /// at /crdt-sync) are being replaced.
    #[arg(long, default_value = "2", value_parser = agent_mesh::transport::Protocols::parse)]
    link_protocols: agent_mesh::transport::Protocols,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
            Some(rendezvous::tls_config(&read(cert)?, &read(key)?).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    let identity = match &args.identity {
        Some(path) => agent_mesh::identity::Identity::load_or_create(path)?,
        None => agent_mesh::identity::Identity::generate(),
    };
    let node = identity.node_id();
    let state = rendezvous::new_state(identity, args.server_node_id.as_deref());
    state.lock().unwrap().protocols = args.link_protocols;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {} node={node}", listener.local_addr()?);
    Ok(rendezvous::serve(listener, state, tls).await?)
}
