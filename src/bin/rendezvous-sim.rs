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
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let state = mesh_operator::rendezvous_sim::new_state(&args.server_node_id);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    mesh_operator::rendezvous_sim::serve(listener, state).await
}
