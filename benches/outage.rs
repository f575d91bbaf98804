//! The outage benchmark (not a test): real `mesh-agent` processes, both schemes in one run.
//! - **operator**: the agents dial exactly their Pods' assignments (written by the operator, which runs in
//!   process against the real control plane; a stand-in kubelet copies annotations to the agents' files);
//! - **seed**: the same agents in `--peer-selection seed` (the seed's own choice and timing: the first
//!   `maxPeers` alive peers of the presence list, first scan after 10 s, then every 60 s, accepting all).
//!
//! Phases, cumulative: settled → rendezvous killed (SIGKILL) → the operator stopped too, and the 10 % most
//! central agents killed (by betweenness over the live links) → one zone killed. In each, updates are
//! written at random live agents; reported per scheme and phase: the share of (update, live agent) pairs
//! delivered, p50/p99 delivery latency, the most links any agent held at once (each agent's own
//! high-water mark), the fewest links at a live agent 10 s into the phase, inbound links refused, and per
//! update: its copies sent whole over mesh links, and its id announced on them (count and bytes).
//!
//!     cargo bench --bench outage        (AGENTS=200 UPDATES=20 MAX_PEERS=4 by default; needs the control plane)
//!
//! `LINK_PROTOCOLS=1` runs the agents on plaintext link protocol 1 (the hub speaking both), the same
//! binaries otherwise, to compare with TLS; `BROADCAST=flood` has the operator's agents flood updates over
//! every link instead of the tree (the seed's agents always flood, as the seed did); `AGENT_FLAGS` adds
//! flags to the operator's agents; `SCHEMES=operator` skips the seed scheme.
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use support::agents::{Agent, AgentDir, HubProcess, Kubelet, Mode, agent_pod, agents_follow_the_plan, workspace_bins};
use support::*;

const ZONES: usize = 3;
/// How long after its last write a phase waits for stragglers before it counts what was delivered.
const DEADLINE: Duration = Duration::from_secs(15);
/// How far into a phase its fewest links at a live agent are counted.
const DEGREE_AT: Duration = Duration::from_secs(10);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Whether the agents speak plaintext protocol 1 (`LINK_PROTOCOLS=1`) rather than TLS.
fn plaintext() -> bool {
    std::env::var("LINK_PROTOCOLS").is_ok_and(|p| p == "1")
}

/// A hub the agents reach over the link protocol this run measures.
async fn hub() -> HubProcess {
    if !plaintext() {
        return HubProcess::start().await;
    }
    let mut hub = HubProcess::start_with(&["--link-protocols", "1,2"]).await;
    hub.sync.url = hub.sync.url.replacen("wss://", "ws://", 1);
    hub
}

/// The cap and the policy's `maxPeers`.
fn cap() -> usize {
    env("MAX_PEERS", 4)
}

/// How the operator's agents broadcast: `tree` unless `BROADCAST=flood`.
fn broadcast() -> &'static str {
    if std::env::var("BROADCAST").is_ok_and(|b| b == "flood") { "flood" } else { "tree" }
}

/// More flags for the operator's agents, to try settings (`AGENT_FLAGS="--graft-after 50ms"`).
fn more_flags() -> Vec<&'static str> {
    static FLAGS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FLAGS.get_or_init(|| std::env::var("AGENT_FLAGS").unwrap_or_default()).split_whitespace().collect()
}

/// The agents' flags for the link protocol this run measures, after `extra`.
fn agent_flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = extra.to_vec();
    if plaintext() {
        flags.extend(["--link-protocols", "1"]);
    }
    flags
}

/// The rendezvous as a process of its own, so it can be killed for real.
#[derive(Default)]
struct Row {
    scheme: &'static str,
    phase: &'static str,
    live: usize,
    delivered: f64,
    p50: f64,
    p99: f64,
    max_links: f64,
    fewest_links: usize,
    refused: f64,
    messages_per_update: f64,
    announcements_per_update: f64,
    announcement_bytes_per_update: f64,
    rss_median: f64,
    rss_max: f64,
}

async fn totals(agents: &[&Agent], metric: &str) -> f64 {
    let mut sum = 0.0;
    for a in agents {
        sum += a.metric(metric, "").await;
    }
    sum
}

/// The per-agent counters a phase reports as differences.
const COUNTERS: [&str; 4] = [
    "agentmesh_mesh_messages_sent",
    "agentmesh_mesh_announcements_sent",
    "agentmesh_mesh_announcement_bytes_sent",
    "agentmesh_links_refused",
];

async fn counters(live: &[&Agent]) -> [f64; 4] {
    let mut out = [0.0; 4];
    for (i, c) in COUNTERS.iter().enumerate() {
        out[i] = totals(live, c).await;
    }
    out
}

/// Prints how many pieces the live agents' links form, and where the agents that lack one of `keys` sit:
/// an update cannot reach another piece while the rendezvous is down.
async fn pieces(live: &[&Agent], keys: &[String]) {
    let index: std::collections::HashMap<&str, usize> =
        live.iter().enumerate().map(|(i, a)| (a.node_id.as_str(), i)).collect();
    let mut piece: Vec<usize> = (0..live.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    let mut lacking = Vec::new();
    for (i, a) in live.iter().enumerate() {
        for peer in a.links().await.unwrap_or_default() {
            if let Some(&j) = index.get(peer.as_str()) {
                let (ri, rj) = (root(&mut piece, i), root(&mut piece, j));
                piece[ri] = rj;
            }
        }
        let have = a.updates().await.unwrap_or_default();
        let missing = keys.iter().filter(|k| !have.contains(*k)).count();
        if missing > 0 {
            lacking.push((i, missing));
        }
    }
    let mut sizes = std::collections::BTreeMap::new();
    for i in 0..live.len() {
        *sizes.entry(root(&mut piece, i)).or_insert(0usize) += 1;
    }
    let lacking: Vec<String> = lacking
        .iter()
        .map(|(i, m)| format!("{} lacks {m} (piece of {})", live[*i].name, sizes[&root(&mut piece, *i)]))
        .collect();
    eprintln!("pieces {:?}; {}", sizes.values().collect::<Vec<_>>(), lacking.join(", "));
}

/// The fewest links any live agent holds, and how many hold fewer than k − 1 (each printed with its
/// planned peers lost and its standby links).
async fn fewest_links(live: &[&Agent]) -> (usize, usize) {
    let (mut fewest, mut below) = (usize::MAX, 0);
    for a in live {
        let status = a.status().await.unwrap_or_default();
        let links = status["links"].as_array().map_or(&[][..], Vec::as_slice);
        fewest = fewest.min(links.len());
        if links.len() + 1 < cap() {
            below += 1;
            let standbys = links.iter().filter(|l| l["standby"] == json!(true)).count();
            let lost = status["lost"].as_array().map_or(0, Vec::len);
            eprintln!("  {} holds {} links ({standbys} standby), {lost} planned peers lost", a.name, links.len());
        }
    }
    (fewest, below)
}

/// Writes `n` updates at random live agents and measures their delivery to every live agent. `started` is
/// when the phase's failure happened.
async fn phase(
    scheme: &'static str,
    phase: &'static str,
    live: &[&Agent],
    n: usize,
    started: tokio::time::Instant,
) -> Row {
    let at_ten = async {
        tokio::time::sleep_until(started + DEGREE_AT).await;
        fewest_links(live).await
    };
    let (mut row, (fewest, below)) = tokio::join!(deliver(live, n), at_ten);
    let (refused, slow) =
        (totals(live, "agentmesh_protocol_errors").await, totals(live, "agentmesh_slow_links_dropped").await);
    let grafts = totals(live, "agentmesh_mesh_grafts_sent").await;
    let standbys = totals(live, "agentmesh_standby_links").await;
    eprintln!(
        "{scheme} / {phase}: protocol errors {refused}, slow links {slow}, grafts so far {grafts}, standby links \
         {standbys}, agents under k − 1 links 10 s in {below}"
    );
    let mut rss: Vec<f64> = live.iter().filter_map(|a| rss_mib(a.pid())).collect();
    rss.sort_by(f64::total_cmp);
    row.scheme = scheme;
    row.phase = phase;
    row.fewest_links = fewest;
    row.rss_median = rss.get(rss.len() / 2).copied().unwrap_or(f64::NAN);
    row.rss_max = rss.last().copied().unwrap_or(f64::NAN);
    row
}

/// Writes `n` updates at random live agents and measures their delivery to every live agent.
async fn deliver(live: &[&Agent], n: usize) -> Row {
    let before = counters(live).await;
    let mut keys = Vec::new();
    for _ in 0..n {
        keys.push(live[rand::random_range(0..live.len())].append().await);
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (delivered, mut latencies) = loop {
        let mut latencies = Vec::new();
        for a in live {
            for u in a.seen().await.unwrap_or_default().iter().filter(|u| keys.iter().any(|k| u["key"] == json!(k))) {
                latencies.push(u["firstSeenMs"].as_f64().unwrap_or(f64::NAN) - u["writtenAtMs"].as_f64().unwrap());
            }
        }
        if latencies.len() == n * live.len() || tokio::time::Instant::now() > deadline {
            break (latencies.len(), latencies);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    latencies.sort_by(f64::total_cmp);
    let pct =
        |p: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    let mut max_links: f64 = 0.0;
    for a in live {
        max_links = max_links.max(a.metric("agentmesh_max_open_links", "").await);
    }
    pieces(live, &keys).await;
    let after = counters(live).await;
    let per_update = |i: usize| (after[i] - before[i]) / n as f64;
    Row {
        live: live.len(),
        delivered: delivered as f64 / (n * live.len()) as f64,
        p50: pct(0.5),
        p99: pct(0.99),
        max_links,
        refused: after[3] - before[3],
        messages_per_update: per_update(0),
        announcements_per_update: per_update(1),
        announcement_bytes_per_update: per_update(2),
        ..Row::default()
    }
}

/// The live agents, most central first: by betweenness (Brandes) over the links they hold.
async fn most_central(agents: &[Option<Agent>]) -> Vec<usize> {
    let live: Vec<usize> = (0..agents.len()).filter(|i| agents[*i].is_some()).collect();
    let index: std::collections::HashMap<&str, usize> =
        live.iter().enumerate().map(|(j, &i)| (agents[i].as_ref().unwrap().node_id.as_str(), j)).collect();
    let mut adj = vec![Vec::new(); live.len()];
    for (j, &i) in live.iter().enumerate() {
        for peer in agents[i].as_ref().unwrap().links().await.unwrap_or_default() {
            if let Some(&k) = index.get(peer.as_str()) {
                adj[j].push(k as u32);
            }
        }
    }
    let score = mesh_operator::planner::analysis::betweenness(&adj);
    let mut order: Vec<usize> = (0..live.len()).collect();
    order.sort_by(|a, b| score[*b].total_cmp(&score[*a]));
    order.into_iter().map(|j| live[j]).collect()
}

/// A process's resident memory, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn live(agents: &[Option<Agent>]) -> Vec<&Agent> {
    agents.iter().flatten().collect()
}

/// The outage phases over a settled fleet (agent i is in zone i mod 3), stopping `operator` if there is one.
async fn outage(
    scheme: &'static str,
    (mut hub, operator): (HubProcess, Option<Operator>),
    agents: &mut [Option<Agent>],
    updates: usize,
) -> Vec<Row> {
    let now = tokio::time::Instant::now;
    let mut rows = vec![phase(scheme, "settled", &live(agents), updates, now()).await];
    let started = now();
    hub.child.kill().await.unwrap();
    wait_for("every agent to notice the rendezvous is gone", WAIT, || async {
        (totals(&live(agents), "agentmesh_rendezvous_connected").await == 0.0).then_some(())
    })
    .await;
    rows.push(phase(scheme, "rendezvous killed", &live(agents), updates, started).await);
    if let Some(operator) = operator {
        operator.kill().await;
    }
    let central = most_central(agents).await;
    let started = now();
    for i in central.iter().take(agents.len() / 10) {
        agents[*i].take().unwrap().kill().await;
    }
    rows.push(phase(scheme, "operator down, 10% most central killed", &live(agents), updates, started).await);
    let started = now();
    for i in (0..agents.len()).filter(|i| i % ZONES == 0) {
        if let Some(a) = agents[i].take() {
            a.kill().await;
        }
    }
    rows.push(phase(scheme, "one zone killed", &live(agents), updates, started).await);
    rows
}

async fn operator_scheme(n: usize, updates: usize) -> Vec<Row> {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "outage").await;
    let dir = AgentDir::new();
    let hub = hub().await;
    let _kubelet = Kubelet::start(&client, &ns, dir.path(), Duration::from_millis(500));
    let spec = json!({
        "selector": {"matchLabels": {"app": "agent"}}, "maxPeers": cap(), "topologyKey": "zone",
        "heartbeatTimeout": "30s",
        "rendezvous": {"url": format!("http://{}", hub.addr), "pollInterval": "1s", "timeout": "1s"},
    });
    create_policy(&client, &ns, "mesh", spec).await;
    let op = Operator::start(&ns, "op-outage", false).await;
    let ws = hub.sync.clone();
    let mut agents = Vec::new();
    for i in 0..n {
        let (name, ip) = (format!("agent-{i}"), format!("127.2.{}.{}", i / 250, 1 + i % 250));
        let mut flags = agent_flags(&["--seed-delay", "1s", "--seed-scan", "2s", "--broadcast", broadcast()]);
        flags.extend(more_flags());
        agents.push(Some(Agent::spawn_with(dir.path(), &name, &ip, &ws, Mode::Operator, cap(), &flags).await));
        agent_pod(&client, &ns, &name, &ip, Some(&format!("zone-{}", i % ZONES))).await;
    }
    agents_follow_the_plan(&client, &ns, &agents.iter().flatten().collect::<Vec<_>>()).await;
    outage("operator", (hub, Some(op)), &mut agents, updates).await
}

async fn seed_scheme(n: usize, updates: usize) -> Vec<Row> {
    let dir = AgentDir::new();
    let hub = hub().await;
    let ws = hub.sync.clone();
    let mut agents = Vec::new();
    for i in 0..n {
        let (name, ip) = (format!("seed-{i}"), format!("127.3.{}.{}", i / 250, 1 + i % 250));
        let flags = agent_flags(&["--seed-delay", "10s", "--seed-scan", "60s", "--broadcast", "flood"]);
        agents.push(Some(Agent::spawn_with(dir.path(), &name, &ip, &ws, Mode::Seed, cap(), &flags).await));
    }
    wait_for("every seed agent to dial its first maxPeers peers", Duration::from_secs(300), || async {
        for a in agents.iter().flatten() {
            let s = a.status().await?;
            let dialed = s["links"].as_array()?.iter().filter(|l| l["direction"] == "dialed").count();
            if dialed < cap() {
                return None;
            }
        }
        Some(())
    })
    .await;
    outage("seed", (hub, None), &mut agents, updates).await
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and listing: nothing to run.
    }
    let (n, updates) = (env("AGENTS", 200), env("UPDATES", 20));
    workspace_bins();
    let mut rows = operator_scheme(n, updates).await;
    if std::env::var("SCHEMES").map_or(true, |s| s.contains("seed")) {
        rows.extend(seed_scheme(n, updates).await);
    }
    println!(
        "\n{n} agents, maxPeers {}, {ZONES} zones, {updates} updates per phase, {} s deadline, links {}, operator's agents broadcast by {}",
        cap(),
        DEADLINE.as_secs(),
        if plaintext() { "plaintext (protocol 1)" } else { "mutual TLS (protocol 2)" },
        broadcast()
    );
    println!(
        "| scheme | phase | live agents | delivered | p50 | p99 | max links at an agent | fewest links 10 s in | links refused | copies per update | ids announced per update (bytes) | agent RSS median / max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} % | {:.0} ms | {:.0} ms | {} | {} | {} | {:.1} | {:.1} ({:.0} B) | {:.1} / {:.1} MiB |",
            r.scheme,
            r.phase,
            r.live,
            r.delivered * 100.0,
            r.p50,
            r.p99,
            r.max_links,
            r.fewest_links,
            r.refused,
            r.messages_per_update,
            r.announcements_per_update,
            r.announcement_bytes_per_update,
            r.rss_median,
            r.rss_max
        );
    }
}
