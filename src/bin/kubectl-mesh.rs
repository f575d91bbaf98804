//! `kubectl mesh`: status, explain and graph of a MeshPolicy's mesh, through the current kubeconfig
//! context (and its namespace, or `-n`), as kubectl plugins do; `--kubeconfig` and `--context` as in
//! kubectl.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Selector;
use kube::{Api, Client, Config, ResourceExt};
use mesh_operator::api::MeshPolicy;
use mesh_operator::inspect::{self, GraphFormat, Scope};

#[derive(Parser)]
#[command(name = "kubectl mesh", version, about = "Inspect the agent mesh that mesh-operator plans")]
struct Args {
    /// Namespace (default: the context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Every namespace (`status` without a policy).
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format of `status`.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Tables without their header line.
    #[arg(long, global = true)]
    no_headers: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Each agent of POLICY (or of every policy in scope): node id, zone, peers it dials, links,
    /// eligibility.
    Status { policy: Option<String> },
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
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What to do about an error the API server gave.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    match e.downcast_ref::<kube::Error>()? {
        kube::Error::Api(s) if s.code == 403 => Some(
            "your user may not read this: kubectl mesh needs get and list on meshpolicies.agentmesh.dev and \
             pods in the namespace (in every namespace with -A; list on nodes for zones from Nodes); see \
             `kubectl auth can-i`",
        ),
        kube::Error::Api(s) if s.code == 401 => Some("the credentials of this kubeconfig context were refused"),
        kube::Error::Api(s) if s.code == 404 => Some("is mesh-operator's MeshPolicy CRD installed in this cluster?"),
        _ => None,
    }
}

/// The client kubectl would use: the kubeconfig and context given, else $KUBECONFIG or ~/.kube/config, or
/// in a Pod its ServiceAccount.
async fn client(args: &Args) -> anyhow::Result<(Client, String)> {
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?,
        (None, Some(_)) => Config::from_kubeconfig(&options).await?,
        (None, None) => Config::infer().await?,
    };
    let ns = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, ns))
}

async fn run(args: Args) -> anyhow::Result<String> {
    let (client, ns) = client(&args).await?;
    let policies: Api<MeshPolicy> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let get_policy = |name: String| {
        let (policies, ns) = (policies.clone(), ns.clone());
        async move {
            policies
                .get_opt(&name)
                .await?
                .ok_or_else(|| anyhow::anyhow!("MeshPolicy {name:?} not found in namespace {ns:?}"))
        }
    };
    Ok(match &args.command {
        Command::Status { policy } => {
            let (chosen, scope) = match (policy, args.all_namespaces) {
                (Some(name), _) => (vec![get_policy(name.clone()).await?], Scope::Policy),
                (None, false) => (policies.list(&Default::default()).await?.items, Scope::Namespace),
                (None, true) => {
                    (Api::<MeshPolicy>::all(client.clone()).list(&Default::default()).await?.items, Scope::All)
                }
            };
            status(&client, &chosen, scope, &args).await?
        }
        Command::Explain { pod } => {
            let pod =
                pods.get_opt(pod).await?.ok_or_else(|| anyhow::anyhow!("Pod {pod:?} not found in namespace {ns:?}"))?;
            inspect::explain(&pod, &policies.list(&Default::default()).await?.items)
        }
        Command::Graph { policy, format } => {
            let policy = get_policy(policy.clone()).await?;
            inspect::graph(&policy, &selected(&client, &policy).await?, *format)
        }
    })
}

/// The Pods `policy` selects, filtered by the API server; a selector the API server cannot take (the
/// CRD does not check label syntax) falls back to every Pod of the namespace, filtered here.
async fn selected(client: &Client, policy: &MeshPolicy) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &policy.namespace().unwrap_or_default());
    let filtered = match Selector::try_from(policy.spec.selector.clone()) {
        Ok(selector) => pods.list(&ListParams::default().labels(&selector.to_string())).await,
        Err(_) => return Ok(Vec::new()),
    };
    let all = match filtered {
        Err(kube::Error::Api(s)) if s.code == 400 => pods.list(&Default::default()).await?,
        other => other?,
    };
    Ok(all.items.into_iter().filter(|p| policy.selects(p)).collect())
}

async fn status(client: &Client, policies: &[MeshPolicy], scope: Scope, args: &Args) -> anyhow::Result<String> {
    let zones = match policies.iter().any(|p| p.spec.topology_key.is_some()) {
        true => node_labels(client).await,
        false => BTreeMap::new(),
    };
    let mut rows = Vec::new();
    for policy in policies {
        let (ns, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
        let pods = match selected(client, policy).await {
            Ok(pods) => pods,
            // One policy's failure is not every policy's.
            Err(e) if scope != Scope::Policy => {
                eprintln!("warning: MeshPolicy {ns}/{name}: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let key = policy.spec.topology_key.as_deref().unwrap_or_default();
        let of_node = |node: &str| zones.get(node)?.get(key).cloned();
        rows.extend(inspect::status_rows(policy, &pods, &of_node).into_iter().map(|r| (ns.clone(), name.clone(), r)));
    }
    Ok(match args.output {
        Output::Table | Output::Wide => {
            inspect::status_table(&rows, scope, args.output == Output::Wide, !args.no_headers)
        }
        Output::Json => serde_json::to_string_pretty(&json_rows(&rows))? + "\n",
        Output::Yaml => serde_yaml::to_string(&json_rows(&rows))?,
    })
}

fn json_rows(rows: &[(String, String, inspect::AgentRow)]) -> serde_json::Value {
    let items = rows.iter().map(|(ns, policy, r)| {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["namespace"] = ns.clone().into();
        v["policy"] = policy.clone().into();
        v
    });
    serde_json::json!({"items": items.collect::<Vec<_>>()})
}

/// Every Node's labels, by name, in one list of their metadata; none for a user who may not list Nodes
/// (who then sees the Pods' own labels only).
async fn node_labels(client: &Client) -> BTreeMap<String, BTreeMap<String, String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.list_metadata(&Default::default()).await {
        Ok(list) => list.items.into_iter().map(|n| (n.name_any(), n.metadata.labels.unwrap_or_default())).collect(),
        Err(_) => BTreeMap::new(),
    }
}
