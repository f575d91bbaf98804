//! End-to-end convergence benchmark (not a test): 1,000 agent Pods on the real control plane, the operator
//! binary as a separate process. Reports the time from an agent being Ready with presence visible to its
//! annotation being written (p50, p99), Pod patches per join and per leave, and the operator's peak RSS.
//!
//!     cargo bench --bench convergence            (AGENTS=… to change the fleet size,
//!                                                 OPERATOR_ARGS="--apply-concurrency 64" to pass flags)
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use mesh_operator::api::{MeshPolicy, PEERS_ANNOTATION};
use serde_json::json;
use support::*;

async fn scrape(port: u16, metric: &str) -> f64 {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    body.lines().find_map(|l| l.strip_prefix(metric)?.trim().parse().ok()).unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Creates agent Pods `agent-{i}` for `range`, Ready and present, at most `in_flight` at a time and, when
/// `pace` is given, starting one per `pace`. Returns when each became Ready with presence visible.
async fn add_agents(
    client: &kube::Client,
    ns: &str,
    rv: &Rendezvous,
    range: std::ops::Range<usize>,
    in_flight: usize,
    pace: Option<Duration>,
) -> HashMap<String, Instant> {
    let mut ticks = pace.map(tokio::time::interval);
    let mut out = HashMap::new();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in range {
        if let Some(t) = ticks.as_mut() {
            t.tick().await;
        }
        while pending.len() >= in_flight {
            out.extend(pending.next().await);
        }
        pending.push(async move {
            let (name, id) = (format!("agent-{i}"), format!("{:064x}", (i as u128 + 1) * 0x9E37_79B9_7F4A_7C15));
            create_pod(client, ns, &name, json!({"app": "agent"}), json!({"agentmesh.dev/node-id": id})).await;
            let ip = format!("127.{}.{}.{}", 1 + i / 62500, (i / 250) % 250, 1 + i % 250);
            set_pod_status(client, ns, &name, &ip, true).await;
            rv.add(&id);
            (name, Instant::now())
        });
    }
    while let Some(done) = pending.next().await {
        out.insert(done.0, done.1);
    }
    out
}

/// Waits (up to 2 min) until every agent in `ready` is annotated, then prints the latency percentiles.
async fn report(assigned: &Mutex<HashMap<String, Instant>>, ready: &HashMap<String, Instant>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.keys().any(|n| !assigned.lock().unwrap().contains_key(n)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = assigned.lock().unwrap().clone();
    let mut latencies: Vec<Duration> =
        ready.iter().filter_map(|(name, t)| done.get(name).map(|a| a.saturating_duration_since(*t))).collect();
    latencies.sort();
    println!("assigned {}/{}", latencies.len(), ready.len());
    if !latencies.is_empty() {
        println!(
            "ready+presence → annotation: p50 {:?}, p99 {:?}, max {:?}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().unwrap()
        );
    }
}

#[tokio::main]
async fn main() {
    let agents: usize = std::env::var("AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "bench").await;
    let rv = Rendezvous::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-operator"))
        .args(["run", "--leader-elect=false", "--namespace", &ns, "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(std::env::var("OPERATOR_ARGS").iter().flat_map(|a| a.split_whitespace()))
        .env("KUBECONFIG", kubeconfig())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mp: MeshPolicy = serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "mesh"}, "spec": {"selector": {"matchLabels": {"app": "agent"}}, "maxPeers": 4,
        "rendezvous": {"url": rv.url(), "pollInterval": "10s", "timeout": "2s"}}}))
    .unwrap();
    Api::<MeshPolicy>::namespaced(client.clone(), &ns).create(&PostParams::default(), &mp).await.unwrap();

    // When each Pod first carries peers.
    let assigned: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let watch = {
        let assigned = assigned.clone();
        let stream = watcher(pods.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = stream.boxed();
            while let Ok(Some(pod)) = stream.try_next().await {
                if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(PEERS_ANNOTATION)) {
                    let name = pod.metadata.name.clone().unwrap();
                    assigned.lock().unwrap().entry(name).or_insert_with(Instant::now);
                }
            }
        })
    };

    println!("burst: creating {agents} agent Pods at once (32 in flight) …");
    let started = Instant::now();
    let ready = add_agents(&client, &ns, &rv, 0..agents, 32, None).await;
    println!("created in {:.1} s", started.elapsed().as_secs_f64());
    report(&assigned, &ready).await;
    println!(
        "burst settled after {:.1} s: {} reconciles ({:.2} s reconciling), {} presence fetches, {} Pod patches",
        started.elapsed().as_secs_f64(),
        scrape(port, "mesh_operator_reconciles_total{result=\"ok\"}").await,
        scrape(port, "mesh_operator_reconcile_duration_seconds_sum").await,
        scrape(port, "mesh_operator_presence_fetches_total{result=\"ok\"}").await,
        scrape(port, "mesh_operator_pod_patches_total").await,
    );

    // A fleet scaling up, not all at once: agents arrive at a steady rate into the settled mesh.
    let paced = agents / 5;
    println!("paced: {paced} more agents, one every 50 ms …");
    let ready = add_agents(&client, &ns, &rv, agents..agents + paced, 4, Some(Duration::from_millis(50))).await;
    report(&assigned, &ready).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let patches = || scrape(port, "mesh_operator_pod_patches_total");
    let before = patches().await;
    let id = format!("{:064x}", 0xfeed_u128);
    create_pod(&client, &ns, "joiner", json!({"app": "agent"}), json!({"agentmesh.dev/node-id": id})).await;
    set_pod_status(&client, &ns, "joiner", "127.250.0.1", true).await;
    rv.add(&id);
    let joined_at = Instant::now();
    while !assigned.lock().unwrap().contains_key("joiner") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("one join into the settled fleet: annotation after {:?}", joined_at.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let join = patches().await - before;
    let before = patches().await;
    pods.delete("agent-500", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let leave = patches().await - before;
    println!("Pod patches per join: {join}, per leave: {leave} (k = 4)");

    let pid = operator.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM: ?").to_string();
    println!("operator peak RSS: {}", hwm.trim_start_matches("VmHWM:").trim());
    watch.abort();
    let _ = operator.kill().await;
}
