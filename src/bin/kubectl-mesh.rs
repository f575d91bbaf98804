//! `kubectl mesh`: status, explain and graph of a MeshPolicy's mesh, through the current kubeconfig
//! context (and its namespace, or `-n`), as kubectl plugins do.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use mesh_operator::api::MeshPolicy;
use mesh_operator::inspect::{self, GraphFormat};

#[derive(Parser)]
#[command(name = "kubectl mesh", about = "Inspect the agent mesh that mesh-operator plans")]
struct Args {
    /// Namespace (default: the current context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Each agent of POLICY: node id, zone, peers it dials, links, eligibility.
    Status { policy: String },
    /// Why POD has or lacks peers.
    Explain { pod: String },
    /// The mesh of POLICY as a graph.
    Graph {
        policy: String,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    mesh_operator::presence::install_crypto_provider();
    match run(args).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<String> {
    let client = Client::try_default().await?;
    let ns = args.namespace.unwrap_or_else(|| client.default_namespace().to_owned());
    let policies: Api<MeshPolicy> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let get_policy = |name: String| {
        let policies = policies.clone();
        let ns = ns.clone();
        async move {
            policies
                .get_opt(&name)
                .await?
                .ok_or_else(|| anyhow::anyhow!("MeshPolicy {name:?} not found in namespace {ns:?}"))
        }
    };
    Ok(match args.command {
        Command::Status { policy } => {
            let policy = get_policy(policy).await?;
            inspect::status_table(&policy, &pods.list(&Default::default()).await?.items)
        }
        Command::Explain { pod } => {
            let pod = pods
                .get_opt(&pod)
                .await?
                .ok_or_else(|| anyhow::anyhow!("Pod {pod:?} not found in namespace {ns:?}"))?;
            inspect::explain(&pod, &policies.list(&Default::default()).await?.items)
        }
        Command::Graph { policy, format } => {
            let policy = get_policy(policy).await?;
            inspect::graph(&policy, &pods.list(&Default::default()).await?.items, format)
        }
    })
}
