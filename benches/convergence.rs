//! End-to-end convergence benchmark (not a test): the operator binary, as a separate process, against the
//! real control plane, watching one namespace with N agent Pods (default 1,000) among U unrelated Pods
//! (default 0: a Deployment's Pods sharing the namespace). Prints one table:
//!
//! * burst: all N agents created at once (32 in flight); patches per agent; every agent assigned how long
//!   after the last became Ready with presence; the operator's write rate against the API server's apply
//!   capacity, measured next (with U ≥ 3,000);
//! * paced: N/10 more, one every 50 ms: per-agent latency from Ready with presence to its annotation;
//! * one join into the settled fleet (presence first, then Ready; and Ready first, then presence); one
//!   leave (Pod deleted → no Pod names it); patches for each;
//! * at rest (60 s): Pod patches, and API requests per second (the API server's own count; the operator is
//!   its only client but for this benchmark's one watch);
//! * the operator's peak and resting RSS, and at rest its anonymous and file-backed RSS.
//!
//! ```text
//! AGENTS=10000 UNRELATED=20000 cargo bench --bench convergence
//! OPERATOR_ARGS="--pod-selector app=agent" …     (flags for the operator)
//! OPERATOR_LOG=mesh_operator=debug PACED=100 …   (its log filter, to see each reconcile's steps; fewer paced)
//! ```
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use mesh_operator::api::MeshPolicy;
use mesh_operator::assignment::PEERS as PEERS_ANNOTATION;
use serde_json::json;
use support::*;

/// What the benchmark's own watch saw: when each Pod first carried peers, and what each carries now.
#[derive(Default)]
struct Seen {
    assigned: HashMap<String, Instant>,
    linked: HashMap<String, String>,
}

type Shared = Arc<Mutex<Seen>>;

async fn scrape(port: u16, metric: &str) -> f64 {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    body.lines().find_map(|l| l.strip_prefix(metric)?.trim().parse().ok()).unwrap_or(0.0)
}

/// Requests the API server has answered, from its own metrics.
async fn api_requests(client: &kube::Client) -> f64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let body = client.request_text(req).await.unwrap();
    body.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    format!("{:.0} MiB", kb / 1024.0)
}

/// A distinct 64-hex-digit id that looks like the hex Ed25519 key a real agent has (uniform digits: ids
/// that share long prefixes would make every map lookup look slower than it is).
fn node_id(i: usize) -> String {
    let half = |salt: u64| xxhash_rust::xxh3::xxh3_128_with_seed(&(i as u64).to_le_bytes(), salt);
    format!("{:032x}{:032x}", half(1), half(2))
}

fn ip(i: usize) -> String {
    format!("127.{}.{}.{}", 1 + i / 62500, (i / 250) % 250, 1 + i % 250)
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
            let (name, id) = (format!("agent-{i}"), node_id(i));
            create_pod(client, ns, &name, json!({"app": "agent"}), json!({"agentmesh.dev/node-id": id})).await;
            rv.add(&id);
            set_pod_status(client, ns, &name, &ip(i), true).await;
            (name, Instant::now())
        });
    }
    while let Some(done) = pending.next().await {
        out.insert(done.0, done.1);
    }
    out
}

/// Pods as a busy cluster runs them: a Deployment's labels, a few annotations, a container with resources.
async fn add_unrelated(client: &kube::Client, ns: &str, count: usize) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let create = |i: usize| {
        let pods = pods.clone();
        async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("web-{i}"),
                    "labels": {"app": "web", "pod-template-hash": "7c9d8f6b5", "team": "storefront", "tier": "frontend"},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                        "kubectl.kubernetes.io/restartedAt": "2026-11-01T10:00:00Z"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c9d8f6b5",
                        "uid": "2b4f9a1e-0c3d-4e5f-8a9b-1c2d3e4f5a6b", "controller": true}]},
                "spec": {"containers": [{"name": "web", "image": "registry.example.com/storefront/web:1.42.0",
                    "ports": [{"containerPort": 8080}], "env": [{"name": "MODE", "value": "production"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}}]}
            }))
            .unwrap();
            pods.create(&PostParams::default(), &pod).await.expect("creating an unrelated Pod");
        }
    };
    futures::stream::iter(0..count).map(create).buffer_unordered(32).collect::<Vec<()>>().await;
}

/// The API server's capacity for the operator's kind of write, measured beside the idle operator: server-side
/// applies of one annotation to `count` of the unrelated Pods, 16 in flight. Applies per second.
async fn apply_capacity(client: &kube::Client, ns: &str, count: usize) -> f64 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let params = kube::api::PatchParams::apply("bench-capacity-probe").force();
    let apply = |i: usize| {
        let (pods, params) = (pods.clone(), params.clone());
        async move {
            let body = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("web-{i}"), "annotations": {"bench.example/probe": "1"}}});
            let name = format!("web-{i}");
            pods.patch(&name, &params, &kube::api::Patch::Apply(&body)).await.expect("a probe apply");
        }
    };
    let started = Instant::now();
    futures::stream::iter(0..count).map(apply).buffer_unordered(16).collect::<Vec<()>>().await;
    count as f64 / started.elapsed().as_secs_f64()
}

/// The operator's write rate over a burst: its Pod patches between the first annotation and the last.
fn write_rate(seen: &Shared, ready: &HashMap<String, Instant>, patches: f64) -> f64 {
    let assigned = seen.lock().unwrap().assigned.clone();
    let times: Vec<Instant> = ready.keys().filter_map(|n| assigned.get(n).copied()).collect();
    let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    patches / last.saturating_duration_since(*first).as_secs_f64().max(1e-3)
}

/// Waits (up to 5 min) until every agent in `ready` is annotated; the latency percentiles, and how long
/// after the last one became Ready the last annotation came.
async fn settle(seen: &Shared, ready: &HashMap<String, Instant>) -> (Duration, Duration, Duration) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready.keys().any(|n| !seen.lock().unwrap().assigned.contains_key(n)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = seen.lock().unwrap().assigned.clone();
    let mut latencies: Vec<Duration> = ready
        .iter()
        .map(|(name, t)| done.get(name).map_or(Duration::MAX, |a| a.saturating_duration_since(*t)))
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let last_ready = ready.values().max().unwrap();
    let last_assigned = ready.keys().filter_map(|n| done.get(n)).max().unwrap();
    (pct(0.5), pct(0.99), last_assigned.saturating_duration_since(*last_ready))
}

/// The longest time between two consecutive Ready times: a pause of admission::QUIET ends a burst.
fn longest_pause(ready: &HashMap<String, Instant>) -> Duration {
    let mut at: Vec<Instant> = ready.values().copied().collect();
    at.sort();
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

async fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let url = format!("http://127.0.0.1:{port}/readyz");
    while !reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "timed out waiting for the operator to be ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ms(d: Duration) -> String {
    if d == Duration::MAX { "never".into() } else { format!("{:.0} ms", d.as_secs_f64() * 1000.0) }
}

#[tokio::main]
async fn main() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (agents, unrelated) = (env("AGENTS", 1000), env("UNRELATED", 0));
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "bench").await;
    let mut rows: Vec<(String, String)> = vec![];
    let mut row = |k: &str, v: String| {
        println!("{k}: {v}");
        rows.push((k.into(), v));
    };
    if unrelated > 0 {
        let t = Instant::now();
        add_unrelated(&client, &ns, unrelated).await;
        row(&format!("{unrelated} unrelated Pods created"), format!("{:.1} s", t.elapsed().as_secs_f64()));
    }
    let rv = Rendezvous::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let operator_args = std::env::var("OPERATOR_ARGS").unwrap_or_default();
    // OPERATOR_WRAPPER="heaptrack -o /tmp/operator" profiles the operator's heap (its RSS is then the wrapper's).
    let wrapper = std::env::var("OPERATOR_WRAPPER").unwrap_or_default();
    let mut command: Vec<&str> = wrapper.split_whitespace().collect();
    command.push(env!("CARGO_BIN_EXE_mesh-operator"));
    let mut operator = tokio::process::Command::new(command[0])
        .args(&command[1..])
        .args(["run", "--leader-elect=false", "--namespace", &ns, "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(operator_args.split_whitespace())
        .env("KUBECONFIG", kubeconfig())
        .env("RUST_LOG", std::env::var("OPERATOR_LOG").unwrap_or_else(|_| "warn".into()))
        .kill_on_drop(true)
        // Its own process group: a wrapper's child (heaptrack's) is killed with it.
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = operator.id().unwrap();
    // The policy comes once the operator has listed everything (as when a policy is added to a running
    // operator): its Pod watch then relists for the policy's selector while the burst arrives.
    wait_ready(port).await;
    let mp: MeshPolicy = serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "mesh"}, "spec": {"selector": {"matchLabels": {"app": "agent"}}, "maxPeers": 4,
        "rendezvous": {"url": rv.url(), "pollInterval": "10s", "timeout": "2s"}}}))
    .unwrap();
    Api::<MeshPolicy>::namespaced(client.clone(), &ns).create(&PostParams::default(), &mp).await.unwrap();

    let seen: Shared = Arc::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let watch = {
        let seen = seen.clone();
        let stream = watcher(pods.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = stream.boxed();
            while let Ok(Some(pod)) = stream.try_next().await {
                let a = pod.metadata.annotations.unwrap_or_default();
                let name = pod.metadata.name.unwrap();
                let mut seen = seen.lock().unwrap();
                if a.contains_key(PEERS_ANNOTATION) {
                    seen.assigned.entry(name.clone()).or_insert_with(Instant::now);
                }
                let linked = format!(
                    "{}{}",
                    a.get(PEERS_ANNOTATION).cloned().unwrap_or_default(),
                    a.get("agentmesh.dev/accepts").cloned().unwrap_or_default()
                );
                seen.linked.insert(name, linked);
            }
        })
    };
    let patches = || scrape(port, r#"mesh_operator_pod_patches_total{result="ok"}"#);

    println!("burst: {agents} agent Pods at once (32 in flight) …");
    let started = Instant::now();
    let ready = add_agents(&client, &ns, &rv, 0..agents, 32, None).await;
    row("burst: created and Ready in", format!("{:.1} s", started.elapsed().as_secs_f64()));
    row("burst: longest pause between two agents becoming Ready", ms(longest_pause(&ready)));
    let (p50, p99, after_last) = settle(&seen, &ready).await;
    row("burst: every agent assigned, after the last became Ready", ms(after_last));
    row("burst: Ready → annotation p50 / p99", format!("{} / {}", ms(p50), ms(p99)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let burst_patches = patches().await;
    row("burst: Pod patches per agent", format!("{:.2}", burst_patches / agents as f64));
    if unrelated >= 3000 {
        let (rate, capacity) = (write_rate(&seen, &ready, burst_patches), apply_capacity(&client, &ns, 3000).await);
        row(
            "burst: the operator's write rate / the API server's apply capacity (same run)",
            format!("{rate:.0} / {capacity:.0} per s ({:.0} %)", 100.0 * rate / capacity),
        );
    }

    let paced = env("PACED", agents / 10);
    let before = patches().await;
    let ready = add_agents(&client, &ns, &rv, agents..agents + paced, 4, Some(Duration::from_millis(50))).await;
    let (p50, p99, _) = settle(&seen, &ready).await;
    row(&format!("paced ({paced}, one per 50 ms): Ready → annotation p50 / p99"), format!("{} / {}", ms(p50), ms(p99)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    row("paced: Pod patches per agent", format!("{:.2}", (patches().await - before) / paced as f64));
    let n = agents + paced;

    tokio::time::sleep(Duration::from_secs(5)).await;
    for (case, presence_first) in [("presence, then Ready", true), ("Ready, then presence", false)] {
        let i = if presence_first { n } else { n + 1 };
        let (name, id) = (format!("agent-{i}"), node_id(i));
        let before = patches().await;
        create_pod(&client, &ns, &name, json!({"app": "agent"}), json!({"agentmesh.dev/node-id": id})).await;
        if presence_first {
            rv.add(&id);
            tokio::time::sleep(Duration::from_millis(200)).await;
            set_pod_status(&client, &ns, &name, &ip(i), true).await;
        } else {
            set_pod_status(&client, &ns, &name, &ip(i), true).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            rv.add(&id);
        }
        let t0 = Instant::now();
        wait_until("the joiner's annotation", || seen.lock().unwrap().assigned.contains_key(&name)).await;
        let latency = seen.lock().unwrap().assigned[&name].saturating_duration_since(t0);
        tokio::time::sleep(Duration::from_secs(3)).await;
        row(&format!("one join ({case}) → annotation"), ms(latency));
        row(&format!("one join ({case}): Pod patches"), format!("{}", patches().await - before));
    }
    let (gone, id) = ("agent-500", node_id(500));
    let before = patches().await;
    pods.delete(gone, &DeleteParams::default()).await.unwrap();
    let t0 = Instant::now();
    wait_until("no Pod to name the deleted agent", || seen.lock().unwrap().linked.values().all(|l| !l.contains(&id)))
        .await;
    row("one leave → no Pod names it", ms(t0.elapsed()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    row("one leave: Pod patches", format!("{}", patches().await - before));

    let (before, requests, t0) = (patches().await, api_requests(&client).await, Instant::now());
    tokio::time::sleep(Duration::from_secs(60)).await;
    let rate = (api_requests(&client).await - requests) / t0.elapsed().as_secs_f64();
    row("at rest (60 s): Pod patches", format!("{}", patches().await - before));
    row("at rest: API requests per second", format!("{rate:.2}"));
    row("operator RSS at rest / peak", format!("{} / {}", rss(pid, "VmRSS:"), rss(pid, "VmHWM:")));
    // Anonymous memory (the heap and stacks) apart from the binary's pages that were touched.
    row("operator RSS at rest: anonymous / file", format!("{} / {}", rss(pid, "RssAnon:"), rss(pid, "RssFile:")));

    println!(
        "\n| {agents} agents, {unrelated} unrelated Pods{} | |\n|---|---|",
        if operator_args.is_empty() { String::new() } else { format!(", `{operator_args}`") }
    );
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    watch.abort();
    // SAFETY: signals the process group this benchmark started, nothing else.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    let _ = operator.kill().await;
    // Its Pods would weigh on every later run against this control plane (which has no namespace controller).
    let _ = pods.delete_collection(&DeleteParams::default(), &Default::default()).await;
}
