//! Real agents for the end-to-end tests: `mesh-agent` processes on loopback addresses that match their Pods'
//! IPs, a stand-in kubelet that copies each Pod's annotations into its agent's downward-API file after a
//! random lag (different per Pod, as a kubelet's is), and a sampler of every agent's open links.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use super::*;

/// Builds `mesh-agent` and `rendezvous` once per test binary, in this binary's profile (they belong to other
/// workspace members, so cargo does not build them for this package's tests and benches), and returns the
/// directory holding them.
pub fn workspace_bins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--locked", "-p", "mesh-agent", "-p", "rendezvous", "--bins"])
            .args(release.then_some("--release"))
            .current_dir(REPO)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building mesh-agent and rendezvous failed");
        dir
    })
}

/// The Python that runs `tests/python/agent.py`: a virtual environment in `_output/python` with the pinned
/// packages of `tests/python/requirements.txt`, made on first use (`MESH_PYTHON` names another).
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Some(p) = std::env::var_os("MESH_PYTHON") {
            return PathBuf::from(p);
        }
        let status =
            std::process::Command::new(format!("{REPO}/hack/python-env.sh")).status().expect("hack/python-env.sh");
        assert!(status.success(), "hack/python-env.sh failed");
        PathBuf::from(format!("{REPO}/_output/python/bin/python"))
    })
}

/// Where a test's agents keep their keys, assignment files and logs: removed when the test passes, kept
/// (and its path printed) when it fails, so the agents' logs can be read.
pub struct AgentDir(Option<tempfile::TempDir>);

impl AgentDir {
    pub fn new() -> AgentDir {
        AgentDir(Some(tempfile::tempdir().unwrap()))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("until dropped").path()
    }
}

impl Drop for AgentDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("the agents' logs are kept in {}", dir.keep().display());
        }
    }
}

/// A rendezvous as agents reach it: its link URL and the node id they pin.
#[derive(Clone, Debug)]
pub struct SyncHub {
    pub url: String,
    pub node_id: String,
}

impl SyncHub {
    /// The hub of a rendezvous listening on `addr` (host:port) with node id `node_id`.
    pub fn at(addr: &str, node_id: &str) -> SyncHub {
        SyncHub { url: format!("wss://{addr}/crdt-sync"), node_id: node_id.into() }
    }
}

/// A `rendezvous` process on loopback, with a key of its own.
pub struct HubProcess {
    pub child: tokio::process::Child,
    /// host:port of its HTTP API and its hub.
    pub addr: String,
    pub sync: SyncHub,
}

impl HubProcess {
    pub async fn start() -> HubProcess {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> HubProcess {
        let mut child = tokio::process::Command::new(workspace_bins().join("rendezvous"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting rendezvous");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("rendezvous to start").unwrap().unwrap();
        let (addr, node) = line.trim_start_matches("listening on ").split_once(" node=").expect("ADDR node=ID");
        HubProcess { addr: addr.to_string(), sync: SyncHub::at(addr, node), child }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Operator,
    Seed,
}

/// What a test reads from one agent, a process of its own or a container in a Pod: its API.
#[derive(Clone, Debug)]
pub struct AgentApi {
    pub name: String,
    pub node_id: String,
    /// Its test API (`/status`, `/updates`).
    pub api: SocketAddr,
    /// Its `/metrics`.
    pub metrics: SocketAddr,
}

/// One `mesh-agent` process.
pub struct Agent {
    pub ip: String,
    /// Where it accepts mesh links.
    pub mesh: SocketAddr,
    pub annotations: PathBuf,
    view: AgentApi,
    child: tokio::process::Child,
}

impl std::ops::Deref for Agent {
    type Target = AgentApi;
    fn deref(&self) -> &AgentApi {
        &self.view
    }
}

impl AsRef<AgentApi> for Agent {
    fn as_ref(&self) -> &AgentApi {
        &self.view
    }
}

impl AsRef<AgentApi> for AgentApi {
    fn as_ref(&self) -> &AgentApi {
        self
    }
}

impl Agent {
    /// Starts an agent on `ip` (mesh port chosen by the OS), announcing `name` as its hostname; seed mode
    /// scans after 1 s and every 2 s.
    pub async fn spawn(dir: &Path, name: &str, ip: &str, hub: &SyncHub, mode: Mode, cap: usize) -> Agent {
        Self::spawn_with(dir, name, ip, hub, mode, cap, &["--seed-delay", "1s", "--seed-scan", "2s"]).await
    }

    pub async fn spawn_with(
        dir: &Path,
        name: &str,
        ip: &str,
        hub: &SyncHub,
        mode: Mode,
        cap: usize,
        extra: &[&str],
    ) -> Agent {
        let mut cmd = tokio::process::Command::new(workspace_bins().join("mesh-agent"));
        cmd.args(["--poll-interval", "100ms", "--heartbeat", "1s"])
            .args(extra)
            .args(["--peer-selection", if mode == Mode::Seed { "seed" } else { "operator" }])
            .env("RUST_LOG", "agent_mesh=debug");
        if extra.contains(&"--assignment-source") {
            cmd.env("KUBECONFIG", kubeconfig());
        }
        // An agent restarted where it listened before names its address itself.
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", &format!("{ip}:0")]);
        }
        Self::launch(cmd, dir, name, ip, hub, cap).await
    }

    /// Starts the Python agent (`tests/python/agent.py`, the protocol's second implementation) as
    /// [`Agent::spawn`] starts `mesh-agent`.
    pub async fn spawn_python(dir: &Path, name: &str, ip: &str, hub: &SyncHub, cap: usize) -> Agent {
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(format!("{REPO}/tests/python/agent.py")).args(["--listen", &format!("{ip}:0")]);
        Self::launch(cmd, dir, name, ip, hub, cap).await
    }

    /// Runs `cmd` with the flags both agents share, and reads the line it prints once it listens.
    async fn launch(
        mut cmd: tokio::process::Command,
        dir: &Path,
        name: &str,
        ip: &str,
        hub: &SyncHub,
        cap: usize,
    ) -> Agent {
        let annotations = dir.join(format!("{name}.annotations"));
        cmd.args(["--metrics", &format!("{ip}:0"), "--test-api", &format!("{ip}:0")])
            .args(["--identity", dir.join(format!("{name}.key")).to_str().unwrap()])
            .args(["--rendezvous", &hub.url, "--rendezvous-node-id", &hub.node_id])
            .args(["--hostname", name, "--max-peers", &cap.to_string()])
            .args(["--assignment-file", annotations.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("starting an agent");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("the agent to start").unwrap();
        let line = line.unwrap_or_else(|| panic!("{name} ended before it listened: see {name}.log"));
        let field =
            |k: &str| line.split(' ').find_map(|w| w.strip_prefix(k)).unwrap_or_else(|| panic!("{k} in {line}"));
        let (api, node_id) = (field("test-api=").parse().unwrap(), field("node=").to_string());
        let (mesh, metrics) = (field("mesh=").parse().unwrap(), field("metrics=").parse().unwrap());
        let view = AgentApi { name: name.into(), node_id, api, metrics };
        Agent { ip: ip.into(), mesh, annotations, view, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("a running agent")
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

impl AgentApi {
    pub async fn status(&self) -> Option<Value> {
        http_get(&format!("http://{}/status", self.api)).await
    }

    /// The node ids this agent holds links with now.
    pub async fn links(&self) -> Option<BTreeSet<String>> {
        let s = self.status().await?;
        Some(s["links"].as_array()?.iter().filter_map(|l| l["nodeId"].as_str().map(str::to_string)).collect())
    }

    pub async fn append(&self) -> String {
        self.append_value("x").await
    }

    pub async fn append_value(&self, value: &str) -> String {
        let url = format!("http://{}/updates", self.api);
        let body = json!({"value": value}).to_string();
        let resp = http().post(url).header("content-type", "application/json").body(body).send().await.unwrap();
        let reply: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        reply["key"].as_str().unwrap().to_string()
    }

    /// Every update this agent has: `{key, origin, writtenAtMs, firstSeenMs}`.
    pub async fn seen(&self) -> Option<Vec<Value>> {
        http_get(&format!("http://{}/updates", self.api)).await?.as_array().cloned()
    }

    /// The update keys this agent has.
    pub async fn updates(&self) -> Option<BTreeSet<String>> {
        Some(self.seen().await?.iter().filter_map(|u| u["key"].as_str().map(str::to_string)).collect())
    }

    /// A metric's value (the sum over its label sets when `labels` is empty).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        metric_at(self.metrics, name, labels).await.expect("the agent's /metrics")
    }

    /// The agent's link and relay counters, for failure messages.
    pub async fn counters(&self) -> String {
        let Ok(resp) = http().get(format!("http://{}/metrics", self.metrics)).send().await else {
            return String::new();
        };
        let text = resp.text().await.unwrap_or_default();
        let wanted =
            ["dials_failed", "links_refused", "links_closed", "slow_links", "protocol_errors", "assignment_errors"];
        let lines = text.lines().filter(|l| !l.starts_with('#') && wanted.iter().any(|w| l.contains(w)));
        format!("  {} counters: {}", self.name, lines.collect::<Vec<_>>().join("; "))
    }
}

/// A metric's value at `http://{addr}/metrics` (the sum over its label sets when `labels` is empty). A
/// counter may be named with or without its `_total`.
pub async fn metric_at(addr: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    let text = http().get(format!("http://{addr}/metrics")).send().await.ok()?.text().await.ok()?;
    let named = |l: &str| {
        let metric = l.split(['{', ' ']).next().unwrap_or_default();
        metric == name || metric.strip_suffix("_total") == Some(name)
    };
    let values = text.lines().filter(|l| named(l) && l.contains(labels));
    Some(values.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum())
}

fn http() -> reqwest::Client {
    mesh_operator::presence::install_crypto_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

async fn http_get(url: &str) -> Option<Value> {
    serde_json::from_slice(&http().get(url).send().await.ok()?.bytes().await.ok()?).ok()
}

/// Creates agent Pod `name` (label app=agent, and `zone` when given) and sets it Running and Ready at `ip`.
pub async fn agent_pod(client: &Client, ns: &str, name: &str, ip: &str, zone: Option<&str>) {
    let mut labels = json!({"app": "agent"});
    if let Some(z) = zone {
        labels["zone"] = json!(z);
    }
    create_pod(client, ns, name, labels, json!({})).await;
    set_pod_status(client, ns, name, ip, true).await;
}

/// Each Pod's planned link set (dialed ∪ accepted node ids), by node id; `ids`: Pod name → node id.
pub async fn plans(client: &Client, ns: &str, ids: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns).list(&Default::default()).await.unwrap();
    pods.items
        .iter()
        .filter_map(|p| {
            let a = mesh_operator::assignment::Assignment::from_annotations(p.annotations())?;
            let id = ids.get(&p.name_any())?.clone();
            Some((id, a.linked_ids().into_iter().map(str::to_string).collect()))
        })
        .collect()
}

/// Whom each agent's Pod says it dials and accepts, by short node id: who should open a missing link.
async fn directions(client: &Client, ns: &str, ids: &BTreeMap<String, String>, of: &BTreeSet<&str>) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), ns).list(&Default::default()).await.unwrap();
    let lines = pods.items.iter().filter_map(|p| {
        let a = mesh_operator::assignment::Assignment::from_annotations(p.annotations())?;
        let id = ids.get(&p.name_any()).filter(|id| of.contains(id.as_str()))?;
        let dials: BTreeSet<String> = a.peers.iter().map(|p| p.node_id.to_string()).collect();
        let accepts: BTreeSet<String> = a.accepts.iter().map(|id| id.to_string()).collect();
        Some(format!(
            "  {} dials {} accepts {}",
            short_ids(&[id.clone()].into()),
            short_ids(&dials),
            short_ids(&accepts)
        ))
    });
    lines.collect::<Vec<_>>().join("\n")
}

/// Waits until every agent holds exactly the links its Pod's assignment names, and each has some; on
/// timeout, names every agent that does not and what it holds.
pub async fn agents_follow_the_plan(client: &Client, ns: &str, agents: &[impl AsRef<AgentApi>]) {
    let agents: Vec<&AgentApi> = agents.iter().map(AsRef::as_ref).collect();
    let ids: BTreeMap<String, String> = agents.iter().map(|a| (a.name.clone(), a.node_id.clone())).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let plans = plans(client, ns, &ids).await;
        let (mut off, mut off_ids) = (Vec::new(), BTreeSet::new());
        for a in &agents {
            let plan = plans.get(&a.node_id).cloned().unwrap_or_default();
            let status = a.status().await.unwrap_or_default();
            let held: BTreeSet<String> = status["links"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["nodeId"].as_str().map(str::to_string))
                .collect();
            if plan.is_empty() || held != plan {
                off_ids.insert(a.node_id.as_str());
                off.push(format!("{} plan {} holds {}: {status}", a.name, short_ids(&plan), short_ids(&held)));
                if tokio::time::Instant::now() >= deadline {
                    off.push(a.counters().await);
                }
            }
        }
        if off.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            off.push(directions(client, ns, &ids, &off_ids).await);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agents not following the plan after 180 s:\n{}",
            off.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn short_ids(ids: &BTreeSet<String>) -> String {
    ids.iter().map(|i| i.get(..8).unwrap_or(i)).collect::<Vec<_>>().join(",")
}

/// Stands in for the kubelet's downward-API volume: every Pod's annotations are written to
/// `<dir>/<pod>.annotations`, atomically, a random 0–`max_lag` after they change (each Pod on its own
/// clock, so agents learn a plan change in any order).
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    pub fn start(client: &Client, ns: &str, dir: &Path, max_lag: Duration) -> Kubelet {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let dir = dir.to_path_buf();
        let task = tokio::spawn(async move {
            let mut per_pod: HashMap<String, tokio::sync::watch::Sender<BTreeMap<String, String>>> = HashMap::new();
            let mut stream = watcher(pods, watcher::Config::default()).default_backoff().applied_objects().boxed();
            // A watch error (a busy API server) is retried by the watcher, never the end of the kubelet.
            while let Some(event) = stream.next().await {
                let Ok(pod) = event else { continue };
                let name = pod.name_any();
                let annotations = pod.annotations().clone();
                let tx = per_pod.entry(name.clone()).or_insert_with(|| {
                    let (tx, rx) = tokio::sync::watch::channel(BTreeMap::new());
                    tokio::spawn(refresh(rx, dir.join(format!("{name}.annotations")), max_lag));
                    tx
                });
                tx.send_replace(annotations);
            }
        });
        Kubelet { task }
    }
}

async fn refresh(mut rx: tokio::sync::watch::Receiver<BTreeMap<String, String>>, path: PathBuf, max_lag: Duration) {
    while rx.changed().await.is_ok() {
        tokio::time::sleep(max_lag.mul_f64(rand::random::<f64>())).await;
        let text = agent_mesh::downward::render(&rx.borrow_and_update().clone());
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Samples every agent's open links until dropped, recording the first sample that breaks a rule: all its
/// sockets over `cap` (the agents' `--max-peers`); its links not being closed over the cap the agent holds
/// now (the lower of `--max-peers` and its assignment's, which falls when `maxPeers` is lowered; links being
/// closed keep their slots until gone); a link not being closed with a peer its assignment names neither as
/// planned nor as a standby; more standby links not being closed than the slots its planned peers leave (the
/// cap less the planned peers not lost). That an agent opens nothing while over its cap is the link table's property
/// test (`links.rs`): a sample cannot tell a link opened late from one opened before the drop.
pub struct LinkSampler {
    pub violation: Arc<Mutex<Option<String>>>,
    pub samples: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkSampler {
    pub fn start(apis: Arc<Mutex<Vec<(String, SocketAddr)>>>, cap: usize) -> LinkSampler {
        let violation = Arc::new(Mutex::new(None));
        let samples = Arc::new(Mutex::new(0));
        let (v, n) = (violation.clone(), samples.clone());
        let task = tokio::spawn(async move {
            loop {
                let agents = apis.lock().unwrap().clone();
                for (name, api) in agents {
                    let Some(status) = http_get(&format!("http://{api}/status")).await else { continue };
                    *n.lock().unwrap() += 1;
                    if let Some(why) = breaks_a_rule(&status, cap)
                        && v.lock().unwrap().is_none()
                    {
                        *v.lock().unwrap() = Some(format!("{name} {why}: {status}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        LinkSampler { violation, samples, task }
    }

    pub fn assert_clean(&self) -> u64 {
        if let Some(v) = self.violation.lock().unwrap().clone() {
            panic!("cap violated at an agent: {v}");
        }
        *self.samples.lock().unwrap()
    }
}

/// How an agent's `/status` breaks a rule, if it does: `own` is its `--max-peers`.
fn breaks_a_rule(status: &serde_json::Value, own: usize) -> Option<String> {
    let links = status["links"].as_array().map_or(&[][..], Vec::as_slice);
    let held: Vec<&Value> = links.iter().filter(|l| l["closing"] != serde_json::json!(true)).collect();
    let now = status["cap"].as_u64().map_or(own, |c| c as usize);
    if links.len() > own {
        return Some(format!("held {} links, over the cap {own}", links.len()));
    }
    if held.len() > now {
        return Some(format!("held {} links not being closed, over the cap {now} it holds now", held.len()));
    }
    let named = |key: &str| status[key].as_array().map_or(&[][..], Vec::as_slice).to_vec();
    let (planned, lost) = (named("planned"), named("lost"));
    let room = now.saturating_sub(planned.iter().filter(|p| !lost.contains(p)).count());
    let standbys = held.iter().filter(|l| l["standby"] == json!(true)).count();
    if standbys > room {
        return Some(format!("held {standbys} standby links, over the {room} slots its lost peers leave"));
    }
    let allowed: Vec<Value> = planned.into_iter().chain(named("standbys")).collect();
    let stranger = held.iter().find(|l| !allowed.contains(&l["nodeId"]))?;
    Some(format!("held a link with {}, neither planned nor a standby", stranger["nodeId"]))
}

impl Drop for LinkSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}
