//! `rendezvous-sim`: the presence API for simulated agents, with an admin API (see the library module
//! `mesh_operator::rendezvous_sim`). Prints `listening on ADDR` once it accepts connections.
use clap::Parser;

#[derive(Parser)]
#[command(about = "Rendezvous simulator: presence API plus an admin API to add, kill and fail agents")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// The rendezvous' own node id, reported as `serverNodeId`.
    #[arg(long, default_value = "rendezvous")]
    server_node_id: String,
    /// Serve https with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
            Some(mesh_operator::rendezvous_sim::tls_config(&read(cert)?, &read(key)?).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    let state = mesh_operator::rendezvous_sim::new_state(&args.server_node_id);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    Ok(mesh_operator::rendezvous_sim::serve(listener, state, tls).await?)
}
