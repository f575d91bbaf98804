//! The `mesh-operator` command line. `main.rs` only calls [`main`]; each subcommand is a thin shell over
//! the library.
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::planner::{self, Dials, Member, analysis};
use crate::{api, duration, presence, simulate};

#[derive(Parser, Debug)]
#[command(name = "mesh-operator", version, about = "Plans the supplementary sync mesh of CI build agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `--max-presence-bytes` by default: 8 MiB.
pub const DEFAULT_MAX_PRESENCE_BYTES: usize = 8 << 20;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the MeshPolicy CustomResourceDefinition as YAML.
    Crd,
    /// Plan a mesh offline from a member list or a presence body.
    Plan(PlanArgs),
    /// Compare the planner with the seed agents' scheme on a synthetic fleet.
    Simulate(SimulateArgs),
    /// Run the controller.
    Run(RunArgs),
    /// Check a running operator: it answers /readyz and exports its metrics (the chart's `helm test`).
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The operator's metrics endpoint, e.g. http://mesh-operator-metrics.ops.svc:8080.
    #[arg(long, value_parser = parse_http_url, required_unless_present = "host", conflicts_with = "host")]
    pub url: Option<String>,
    /// Instead of --url: the endpoint's address (an IPv6 one too), as a Service's environment variable
    /// `<SERVICE>_SERVICE_HOST` gives it (the Pod needs `enableServiceLinks`, the default).
    #[arg(long, requires = "port")]
    pub host: Option<std::net::IpAddr>,
    /// With --host: the endpoint's port (`<SERVICE>_SERVICE_PORT_<PORT NAME>`).
    #[arg(long, requires = "host")]
    pub port: Option<u16>,
}

impl CheckArgs {
    fn url(&self) -> String {
        match (&self.url, self.host, self.port) {
            (Some(url), _, _) => url.clone(),
            (None, Some(host), Some(port)) => format!("http://{}", std::net::SocketAddr::new(host, port)),
            _ => unreachable!("clap requires --url, or --host with --port"),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Elect a leader on a Lease; only the leader writes. `--leader-elect=false` for a single replica.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    #[arg(long, default_value = "mesh-operator")]
    pub lease_name: String,
    /// This replica's name in the Lease (defaults to the Pod name, else host and PID).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Largest presence body read, in bytes; larger bodies count as an outage. The default holds 20,000
    /// agents' entries with room to spare and keeps peak memory well inside the chart's limit.
    #[arg(long, default_value_t = DEFAULT_MAX_PRESENCE_BYTES as u64, value_parser = clap::value_parser!(u64).range(1024..=(1 << 32)))]
    pub max_presence_bytes: u64,
    /// Pod patches in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub apply_concurrency: u64,
    /// Watch only these namespaces (for namespace-scoped RBAC): repeat the flag or separate with commas.
    /// All namespaces when not given.
    #[arg(long = "namespace", value_delimiter = ',', value_parser = parse_namespace)]
    pub namespaces: Vec<String>,
    /// Watch only the Pods this label selector matches (`key=value`, `key in (a,b)`, `key`, …), filtered
    /// by the API server: in a busy cluster, the operator then never reads the other Pods at all. Pods
    /// carrying an assignment must match it too, or they cannot be cleaned up.
    #[arg(long, value_parser = parse_pod_selector)]
    pub pod_selector: Option<String>,
    /// Check, on every reconcile, the view each policy keeps between reconciles against one built from
    /// scratch; a difference is logged and counted in `mesh_operator_incremental_mismatches_total`. For
    /// tests and debugging: it costs a full pass per reconcile.
    #[arg(long)]
    pub check_incremental: bool,
    /// PlanChanged Events come at most this often per policy, each summing the changes since the last
    /// (a Go duration, 1s to 24h).
    #[arg(long, default_value = "1m", value_parser = parse_event_interval)]
    pub plan_event_interval: std::time::Duration,
    #[arg(long, value_enum, default_value_t = crate::telemetry::LogFormat::Text)]
    pub log_format: crate::telemetry::LogFormat,
}

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// JSON file: `[{"nodeId": "…", "domain": "…"}]`, or a presence body (a nodes array or an object with
    /// `nodes`); `-` reads standard input.
    #[arg(long)]
    pub input: PathBuf,
    /// The cap: links per agent, dialed plus accepted.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=crate::planner::MAX_CAP as i64))]
    pub max_peers: u32,
    /// The plan's seed (the controller uses the MeshPolicy's UID).
    #[arg(long, default_value = "mesh-operator")]
    pub seed: String,
    /// For presence input: heartbeats older than this are not alive.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub agents: u64,
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=crate::planner::MAX_CAP as i64))]
    pub max_peers: u32,
    /// Failure domains the agents are spread over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub zones: u64,
    /// Fraction of agents failing together with the rendezvous.
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction)]
    pub fail: f64,
    /// Links of the plan the agents report they cannot open (chosen at random): how much planning
    /// around them changes.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub unusable: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s).map_err(|e| e.to_string())
}

fn parse_namespace(s: &str) -> Result<String, String> {
    let dns_label = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if dns_label { Ok(s.to_owned()) } else { Err(format!("{s:?} is not a namespace name (an RFC 1123 label)")) }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

/// An error the user can fix; printed as `error: …` with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("--input {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("--input {path}: malformed JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("--input {path}: {source}")]
    Presence { path: String, source: presence::ParseError },
    #[error("--input {path}: expected a JSON array of members or a presence body")]
    Shape { path: String },
    #[error("--input {path}: {source}")]
    Plan { path: String, source: planner::PlanError },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => {
            print!("{}", api::crd_yaml());
            Ok(())
        }
        Command::Plan(args) => plan_command(&args),
        Command::Simulate(args) => simulate(&args),
        Command::Run(args) => return run(args),
        Command::Check(args) => return check(&args.url()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    crate::telemetry::init_logging(args.log_format);
    crate::presence::install_crypto_provider();
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "mesh-operator".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let settings = crate::controller::Settings {
        metrics_addr: args.metrics_addr,
        leader_elect: args.leader_elect,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
        max_presence_bytes: args.max_presence_bytes as usize,
        apply_concurrency: args.apply_concurrency as usize,
        namespaces: args.namespaces,
        pod_selector: args.pod_selector,
        check_incremental: args.check_incremental,
        plan_event_interval: args.plan_event_interval,
    };
    crate::memory::limit_arenas();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(async {
        let mut config = kube::Config::infer().await?;
        // No request may hang forever (a hung Lease renewal is fenced, but a hung write would stall a policy):
        // watches survive this, as the watcher resumes from its last resourceVersion.
        config.read_timeout = Some(crate::controller::READ_TIMEOUT);
        let client = kube::Client::try_from(config)?;
        crate::controller::run(client, settings, Default::default(), Default::default()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "controller failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `helm test`: exit 0 once `url` answers /readyz with 200 and /metrics names the operator's build; exit 1
/// saying which failed.
fn check(url: &str) -> ExitCode {
    crate::presence::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let result: Result<String, String> = runtime.block_on(async {
        let builder = || reqwest::Client::builder().timeout(Duration::from_secs(10));
        // The image is FROM scratch: without system roots the default client cannot be built (as in
        // `presence::Fetcher`); plain http needs none.
        let http =
            builder().build().or_else(|_| builder().tls_certs_only(Vec::new()).build()).map_err(|e| e.to_string())?;
        let get = |path: &'static str| {
            let http = http.clone();
            async move {
                let answer =
                    http.get(format!("{url}{path}")).send().await.map_err(|e| format!("GET {url}{path}: {e}"))?;
                let status = answer.status();
                let body = answer.text().await.map_err(|e| format!("GET {url}{path}: {e}"))?;
                if status.is_success() { Ok(body) } else { Err(format!("GET {url}{path}: {status}: {}", body.trim())) }
            }
        };
        get("/readyz").await?;
        let metrics = get("/metrics").await?;
        let build = metrics.lines().find(|l| l.starts_with("mesh_operator_build_info{"));
        build.map(str::to_owned).ok_or_else(|| format!("GET {url}/metrics: no mesh_operator_build_info"))
    });
    match result {
        Ok(build) => {
            println!("ready: {url} ({build})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_http_url(s: &str) -> Result<String, String> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(s.trim_end_matches('/').to_owned()),
        _ => Err(format!("{s:?} is not an http:// or https:// URL")),
    }
}

/// A label selector's outline; the API server judges the rest when the operator starts.
fn parse_pod_selector(s: &str) -> Result<String, String> {
    let s = s.trim();
    match s {
        "" => Err("an empty selector: leave the flag out to watch every Pod".into()),
        _ if s.len() > 4096 => Err(format!("{} bytes is longer than 4096", s.len())),
        _ if s.chars().any(char::is_control) => Err("contains a control character".into()),
        _ => Ok(s.to_owned()),
    }
}

fn read_input(path: &std::path::Path) -> Result<Vec<u8>, InputError> {
    let shown = path.display().to_string();
    if shown == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|source| InputError::Read { path: shown, source })?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|source| InputError::Read { path: shown, source })
}

/// Members from either input shape. A presence body keeps the nodes that are live by the seed's rules.
pub fn members_from(path: &str, body: &[u8], heartbeat_timeout: Duration) -> Result<Vec<Member>, InputError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|source| InputError::Json { path: path.into(), source })?;
    let is_member_list = value.as_array().is_some_and(|a| a.iter().all(|m| m.get("nodeId").is_some()));
    if is_member_list {
        return serde_json::from_value(value).map_err(|source| InputError::Json { path: path.into(), source });
    }
    if !(value.is_object() || value.is_array()) {
        return Err(InputError::Shape { path: path.into() });
    }
    let snap = presence::parse(body).map_err(|source| InputError::Presence { path: path.into(), source })?;
    Ok(snap
        .nodes
        .iter()
        .filter(|n| snap.is_live(n, heartbeat_timeout, presence::unix_ms()))
        .map(|n| Member { node_id: n.node_id.to_string(), domain: None })
        .collect())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlannedAgent<'a> {
    node_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
    links: usize,
    dials: Vec<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlanMetrics {
    agents: usize,
    max_peers: u32,
    links: usize,
    max_degree: usize,
    min_degree: usize,
    components: usize,
    diameter: u32,
}

fn plan_command(args: &PlanArgs) -> Result<(), InputError> {
    let path = args.input.display().to_string();
    let body = read_input(&args.input)?;
    let members = members_from(&path, &body, args.heartbeat_timeout)?;
    let plan = planner::plan(&members, args.max_peers, &args.seed, &Dials::new())
        .map_err(|source| InputError::Plan { path: path.clone(), source })?;
    let adj = analysis::adjacency(&plan.dial_lists());
    let degrees = analysis::links(&adj);
    let metrics = PlanMetrics {
        agents: members.len(),
        max_peers: args.max_peers,
        links: plan.graph().edge_count(),
        max_degree: degrees.iter().copied().max().unwrap_or(0),
        min_degree: degrees.iter().copied().min().unwrap_or(0),
        components: analysis::component_sizes(&adj, &vec![false; members.len()]).len(),
        diameter: analysis::diameter(&adj, 5_000, 16).0,
    };
    let mut agents: Vec<PlannedAgent> = members
        .iter()
        .enumerate()
        .map(|(i, m)| PlannedAgent {
            node_id: &m.node_id,
            domain: m.domain.as_deref(),
            links: plan.links(i),
            dials: plan.dial_ids(i),
        })
        .collect();
    agents.sort_by(|a, b| a.node_id.cmp(b.node_id));
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let doc = serde_json::json!({"agents": agents, "metrics": metrics});
            let _ = writeln!(out, "{}", serde_json::to_string_pretty(&doc).expect("serializable"));
        }
        Format::Text => {
            let _ = writeln!(out, "{:<20} {:<12} {:>5}  DIALS", "NODE-ID", "DOMAIN", "LINKS");
            for a in &agents {
                let short: Vec<&str> = a.dials.iter().map(|d| abbreviate(d)).collect();
                let _ = writeln!(
                    out,
                    "{:<20} {:<12} {:>5}  {}",
                    abbreviate(a.node_id),
                    a.domain.unwrap_or("-"),
                    a.links,
                    short.join(",")
                );
            }
            let m = &metrics;
            let _ = writeln!(
                out,
                "\nagents {}  cap {}  links {}  degree {}..{}  components {}  diameter {}",
                m.agents, m.max_peers, m.links, m.min_degree, m.max_degree, m.components, m.diameter
            );
        }
    }
    Ok(())
}

fn abbreviate(id: &str) -> &str {
    id.get(..id.len().min(16)).unwrap_or(id)
}

fn simulate(args: &SimulateArgs) -> Result<(), InputError> {
    let scenario = simulate::Scenario {
        agents: args.agents as usize,
        max_peers: args.max_peers,
        zones: args.zones as usize,
        fail: args.fail,
        unusable: args.unusable as usize,
        seed: args.seed,
    };
    let reports = simulate::run(&scenario).map_err(|source| InputError::Plan { path: "-".into(), source })?;
    let mut out = std::io::stdout().lock();
    if args.format == Format::Json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&reports).expect("serializable"));
        return Ok(());
    }
    let pct = |f: f64| format!("{:.2}%", 100.0 * f);
    let row = |f: &dyn Fn(&simulate::SchemeReport) -> String| [f(&reports[0]), f(&reports[1])];
    let rows = [
        ("max links per agent".to_string(), row(&|r| r.max_links.to_string())),
        ("min links per agent".into(), row(&|r| r.min_links.to_string())),
        ("connected components".into(), row(&|r| r.components.to_string())),
        (
            "diameter".into(),
            row(&|r| format!("{}{}", r.diameter, if r.diameter_exact { "" } else { " (>=, sampled)" })),
        ),
        (
            format!("in one piece after rendezvous + {} random fail", pct(args.fail)),
            row(&|r| pct(r.connected_after_random_failure)),
        ),
        (
            format!("in one piece after rendezvous + {} best-connected fail", pct(args.fail)),
            row(&|r| pct(r.connected_after_targeted_failure)),
        ),
        (
            "in one piece after the worst zone is lost".into(),
            row(&|r| r.connected_after_zone_loss.map_or("n/a".into(), pct)),
        ),
        ("links changed by one join".into(), row(&|r| r.links_changed_on_join.to_string())),
        ("links changed by the best-connected leaving".into(), row(&|r| r.links_changed_on_leave.to_string())),
        ("dial lists changed by one join".into(), row(&|r| r.dial_lists_changed_on_join.to_string())),
        ("dial lists changed by that leave".into(), row(&|r| r.dial_lists_changed_on_leave.to_string())),
    ];
    let around = |f: fn(&simulate::AroundUnusable) -> usize| {
        row(&move |r: &simulate::SchemeReport| r.around_unusable.as_ref().map_or("n/a".into(), |a| f(a).to_string()))
    };
    let rows = rows.into_iter().chain(
        (args.unusable > 0)
            .then(|| {
                let n = args.unusable;
                [
                    (format!("links changed planning around {n} unusable"), around(|a| a.links_changed)),
                    (format!("dial lists changed planning around {n} unusable"), around(|a| a.dial_lists_changed)),
                    (format!("min links per agent around {n} unusable"), around(|a| a.min_links)),
                ]
            })
            .into_iter()
            .flatten(),
    );
    let _ =
        writeln!(out, "{} agents, cap {}, {} zone(s), seed {}\n", args.agents, args.max_peers, args.zones, args.seed);
    let _ = writeln!(out, "{:<58} {:>16} {:>16}", "", reports[0].scheme, reports[1].scheme);
    for (label, [a, b]) in rows {
        let _ = writeln!(out, "{label:<58} {a:>16} {b:>16}");
    }
    Ok(())
}

fn parse_event_interval(value: &str) -> Result<std::time::Duration, String> {
    let d = crate::duration::parse(value).map_err(|e| e.to_string())?;
    let (min, max) = (std::time::Duration::from_secs(1), std::time::Duration::from_secs(24 * 3600));
    if d < min || d > max {
        return Err(format!("{value:?} is outside 1s..24h"));
    }
    Ok(d)
}
