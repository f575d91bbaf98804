//! End-to-end test support: one real control plane per test run (started by `hack/control-plane.sh ensure`
//! unless `KUBECONFIG` names one), a fresh namespace per test, and agent Pods whose status the tests set
//! themselves, as there is no kubelet. Every wait has a timeout and says what it waited for.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Deserialize;
use serde_json::json;

pub mod agents;
pub mod history;
pub mod mesh;
#[allow(unused_imports)]
pub use history::History;
#[allow(unused_imports)]
pub use mesh::*;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The kubeconfig of the control plane under test, starting one on first use.
pub fn kubeconfig() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
            return PathBuf::from(path);
        }
        let out = std::process::Command::new(format!("{REPO}/hack/control-plane.sh"))
            .arg("ensure")
            .output()
            .expect("running hack/control-plane.sh ensure");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "hack/control-plane.sh ensure failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout.lines().find_map(|l| l.strip_prefix("export KUBECONFIG=")).expect("an export line");
        PathBuf::from(line.trim())
    })
}

/// Directory of the binaries built by `hack/control-plane.sh` (kubectl, helm, …).
pub fn tool_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::process::Command::new(format!("{REPO}/hack/control-plane.sh")).arg("bin").output().unwrap();
        assert!(out.status.success(), "hack/control-plane.sh bin: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

pub async fn config() -> Config {
    let kc = Kubeconfig::read_from(kubeconfig()).expect("reading the kubeconfig");
    let mut config =
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("a kubeconfig kube can use");
    // No request may hang a test: a stuck call fails with a timeout error instead.
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(mesh_operator::controller::READ_TIMEOUT);
    config
}

/// A token of ServiceAccount `sa` in `ns` bound to a Pod named `pod` (created here, never scheduled), like
/// the token of a chart replica running in that Pod: the API server names the Pod in the token's user
/// extra, which the chart's leader policy compares with the Lease holder.
pub async fn replica_token(client: &Client, ns: &str, sa: &str, pod: &str) -> String {
    let placeholder: Pod = serde_json::from_value(json!({"metadata": {"name": pod}, "spec": {
        "serviceAccountName": sa, "containers": [{"name": "operator", "image": "mesh-operator:dev"}]}}))
    .unwrap();
    let created = Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &placeholder).await;
    let uid = created.expect("creating the replica's Pod").metadata.uid.unwrap();
    let args = ["create", "token", sa, "-n", ns, "--duration", "1h", "--bound-object-kind", "Pod"];
    let out = tool("kubectl", &[&args[..], &["--bound-object-name", pod, "--bound-object-uid", &uid]].concat());
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The user the chart's replicas act as (its ServiceAccount, for a release `mesh-operator` in `ns`).
pub fn replica_user(ns: &str) -> String {
    format!("system:serviceaccount:{ns}:mesh-operator")
}

/// A config acting as the chart's replica in Pod `identity` of `ns`: its ServiceAccount user, with the
/// Pod name the API server puts in such a token's extra (by impersonation; see [`install_leader_fence`]).
pub async fn replica_config(ns: &str, identity: &str) -> Config {
    let mut config = config().await;
    config.auth_info.impersonate = Some(replica_user(ns));
    config.auth_info.impersonate_user_extra =
        Some([(POD_NAME_EXTRA.to_string(), vec![identity.to_string()])].into_iter().collect());
    config
}

/// The same, as a kubeconfig file in `dir` (for the operator binary).
pub fn replica_kubeconfig(dir: &Path, ns: &str, identity: &str) -> PathBuf {
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap();
    for user in kc["users"].as_sequence_mut().expect("kubeconfig users") {
        user["user"]["as"] = replica_user(ns).into();
        let extra: serde_yaml::Mapping =
            [(POD_NAME_EXTRA.into(), vec![identity.to_string()].into())].into_iter().collect();
        user["user"]["as-user-extra"] = extra.into();
    }
    let path = dir.join(format!("{identity}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path
}

/// Where a ServiceAccount token bound to a Pod carries the Pod's name.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// The chart's leader fence for replicas in `ns`: its `-leader` ValidatingAdmissionPolicy and binding, as
/// `helm template` renders them for a release `mesh-operator` in `ns`.
pub async fn install_leader_fence(client: &Client, ns: &str) {
    use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
    let chart = format!("{REPO}/deploy/helm/mesh-operator");
    let args = ["template", "mesh-operator", &chart, "--kube-version", "1.36.0", "--namespace", ns];
    let out = tool("helm", &[&args[..], &["--show-only", "templates/admissionpolicy.yaml"]].concat());
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    // Cluster-scoped, so named after the namespace too: one fence per test namespace.
    let name = format!("{ns}-mesh-operator-leader");
    let pp = PatchParams::apply("mesh-operator-tests").force();
    let mut applied = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
        if v["metadata"]["name"] != name.as_str() {
            continue;
        }
        applied += 1;
        if v["kind"] == "ValidatingAdmissionPolicy" {
            let policy: ValidatingAdmissionPolicy = serde_json::from_value(v).unwrap();
            Api::<ValidatingAdmissionPolicy>::all(client.clone())
                .patch(&name, &pp, &Patch::Apply(&policy))
                .await
                .unwrap();
        } else {
            let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(v).unwrap();
            Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
                .patch(&name, &pp, &Patch::Apply(&binding))
                .await
                .unwrap();
        }
    }
    assert_eq!(applied, 2, "the chart renders no policy and binding named {name}");
}

/// Lets the replicas' user of `ns` (see [`replica_config`]) do anything, as the chart's RBAC would let it
/// do what it needs.
pub async fn grant_replicas(client: &Client, ns: &str) {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let name = format!("mesh-operator-replicas-{ns}");
    let admin: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": replica_user(ns)}]}))
    .unwrap();
    let pp = PatchParams::apply("mesh-operator-tests").force();
    Api::<ClusterRoleBinding>::all(client.clone()).patch(&name, &pp, &Patch::Apply(&admin)).await.unwrap();
}

/// A client that authenticates with a bearer `token` (a ServiceAccount's) instead of the admin certificate.
pub async fn client_with_token(token: &str) -> Client {
    let mut config = config().await;
    config.auth_info = kube::config::AuthInfo { token: Some(token.trim().to_string().into()), ..Default::default() };
    Client::try_from(config).expect("a client")
}

pub async fn client() -> Client {
    // RUST_LOG=mesh_operator=debug shows the in-process controller's logs.
    if std::env::var_os("RUST_LOG").is_some() {
        mesh_operator::telemetry::init_logging(mesh_operator::telemetry::LogFormat::Text);
    }
    Client::try_from(config().await).expect("a client")
}

/// Polls `check` every 100 ms until it yields a value, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A namespace of its own for one test, with the `default` ServiceAccount that admission requires for
/// Pods (created here unless a controller-manager, which runs with the node, was first).
pub async fn namespace(client: &Client, hint: &str) -> String {
    let suffix: u32 = rand::random::<u32>() % 1_000_000;
    let name = format!("e2e-{hint}-{suffix:06}");
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("creating the namespace");
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    match Api::<ServiceAccount>::namespaced(client.clone(), &name).create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating the default ServiceAccount: {e}"),
    }
    name
}

/// Creates an agent Pod (never scheduled: there is no kubelet) with the given labels and annotations.
pub async fn create_pod(
    client: &Client,
    ns: &str,
    name: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
) -> Pod {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "agent", "image": "agent:dev"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.expect("creating a Pod")
}

/// Sets what a kubelet would: phase Running, the Ready condition and the Pod IP, through the status
/// subresource.
pub async fn set_pod_status(client: &Client, ns: &str, name: &str, ip: &str, ready: bool) -> Pod {
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patching the Pod status")
}

/// Runs one of the built tools (kubectl, helm) against the control plane under test.
pub fn tool(name: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tool_bin_dir().join(name))
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// Installs (server-side applies) the checked-in CRD and waits until it is Established.
pub async fn install_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let yaml = std::fs::read_to_string(format!("{REPO}/crds/meshpolicy.yaml")).unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap();
    api.patch(&name, &PatchParams::apply("mesh-operator-tests").force(), &Patch::Apply(&crd))
        .await
        .expect("applying the CRD");
    wait_for("the MeshPolicy CRD to be Established", Duration::from_secs(30), || async {
        let crd = api.get(&name).await.ok()?;
        let established = crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

/// The rendezvous simulator, in process, on a loopback port of its own.
pub struct Rendezvous {
    pub addr: std::net::SocketAddr,
    pub state: rendezvous::Shared,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Rendezvous {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Serves https with `tls` (see [`test_ca`]).
    pub async fn start_with(tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = rendezvous::new_state(agent_mesh::identity::Identity::generate(), Some("rendezvous-node"));
        let task = tokio::spawn(rendezvous::serve(listener, state.clone(), tls.clone()));
        Self { addr, state, tls, task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.addr)
    }

    /// Where agents link to this rendezvous' hub, and the node id they pin.
    pub fn hub(&self) -> agents::SyncHub {
        agents::SyncHub::at(&self.addr.to_string(), &self.state.lock().unwrap().hub.identity.node_id())
    }

    /// Stops listening: requests are refused until [`Rendezvous::resume`].
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    pub async fn resume(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("rebinding the rendezvous port");
        let serve = rendezvous::serve(listener, self.state.clone(), self.tls.clone());
        self.task = Some(tokio::spawn(serve));
    }

    pub fn add(&self, node_id: &str) {
        let agent = rendezvous::SimAgent {
            node_id: node_id.into(),
            address: "ws://0.0.0.0:3001/crdt-sync".into(),
            hostname: None,
            zone: None,
            alive: true,
            frozen_at_ms: None,
            unreachable: vec![],
        };
        let mut st = self.state.lock().unwrap();
        st.agents.insert(node_id.into(), agent);
        st.changed();
    }

    pub fn set_fail(&self, mode: rendezvous::FailMode) {
        let mut st = self.state.lock().unwrap();
        st.fail = mode;
        st.changed();
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The controller, in process, watching one namespace.
pub struct Operator {
    pub metrics: std::sync::Arc<mesh_operator::telemetry::Metrics>,
    pub health: std::sync::Arc<mesh_operator::telemetry::Health>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Operator {
    pub async fn start(ns: &str, identity: &str, leader_elect: bool) -> Self {
        Self::start_as(client().await, ns, identity, leader_elect).await
    }

    /// Runs the controller with `client`'s credentials (for example a ServiceAccount token).
    pub async fn start_as(client: Client, ns: &str, identity: &str, leader_elect: bool) -> Self {
        Self::start_watching(client, ("mesh-operator", ns), &[ns], identity, leader_elect).await
    }

    /// Runs the controller over `namespaces`, its Lease `lease` (name, namespace).
    pub async fn start_watching(
        client: Client,
        (lease_name, lease_ns): (&str, &str),
        namespaces: &[&str],
        identity: &str,
        leader_elect: bool,
    ) -> Self {
        let metrics_addr = "127.0.0.1:0".parse().unwrap();
        let settings = mesh_operator::controller::Settings {
            metrics_addr,
            leader_elect,
            lease_namespace: lease_ns.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            max_presence_bytes: mesh_operator::cli::DEFAULT_MAX_PRESENCE_BYTES,
            apply_concurrency: 16,
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            pod_selector: None,
            check_incremental: true,
            plan_event_interval: Duration::from_secs(60),
        };
        let metrics = std::sync::Arc::new(mesh_operator::telemetry::Metrics::default());
        let health = std::sync::Arc::new(mesh_operator::telemetry::Health::default());
        let task = tokio::spawn(mesh_operator::controller::run(client, settings, metrics.clone(), health.clone()));
        Self { metrics, health, task }
    }

    /// Where /metrics, /healthz and /readyz listen, once bound.
    pub async fn metrics_addr(&self) -> std::net::SocketAddr {
        wait_for("the metrics server to listen", Duration::from_secs(10), || async { self.health.addr.get().copied() })
            .await
    }

    /// Failed watch requests of `watch` (`pods`, `meshpolicies`, ...) of `kind` (`expired` is a 410).
    pub fn watch_errors(&self, watch: &'static str, kind: &'static str) -> u64 {
        self.metrics.watch_errors.get_or_create(&mesh_operator::telemetry::WatchLabel { watch, kind }).get()
    }

    /// Pod writes that succeeded.
    pub fn pod_patches(&self) -> u64 {
        self.metrics.pod_patches.get_or_create(&mesh_operator::telemetry::ResultLabel { result: "ok".into() }).get()
    }

    /// Ends the controller abruptly, as a crash would: the Lease is not released.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// Every reconcile checked its kept view against one built from scratch (`check_incremental`): none may
/// have differed.
impl Drop for Operator {
    fn drop(&mut self) {
        let mismatches = self.metrics.incremental_mismatches.get();
        if mismatches > 0 && !std::thread::panicking() {
            panic!("{mismatches} reconciles kept a view that differs from one built from scratch (see the log)");
        }
    }
}

/// Creates `n` Ready agent Pods `agent-0…` (label app=agent, node-id annotation, IP 127.0.x.y) and their
/// presence; returns their node ids. `zone(i)` labels Pod i with a zone when given.
pub async fn fleet(
    client: &Client,
    ns: &str,
    rv: &Rendezvous,
    n: usize,
    zone: impl Fn(usize) -> Option<String>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut labels = json!({"app": "agent"});
        if let Some(z) = zone(i) {
            labels["zone"] = json!(z);
        }
        ids.push(present_agent(client, ns, rv, &format!("agent-{i}"), i, labels).await);
    }
    ids
}

/// Creates Ready agent Pod `name` with `labels`, the node id and IP 127.0.x.y of agent number `k`, and
/// its presence; returns its node id.
pub async fn present_agent(
    client: &Client,
    ns: &str,
    rv: &Rendezvous,
    name: &str,
    k: usize,
    labels: serde_json::Value,
) -> String {
    let id = format!("{:064x}", (k as u128 + 1) * 0x9E37_79B9_7F4A_7C15);
    create_pod(client, ns, name, labels, json!({"agentmesh.dev/node-id": id})).await;
    set_pod_status(client, ns, name, &format!("127.0.{}.{}", 1 + k / 250, 1 + k % 250), true).await;
    rv.add(&id);
    id
}

/// A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost:
/// (the CA's PEM, the server's certificate PEM, the server's key PEM).
pub fn test_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    (ca_pem, server.pem(), server_key.serialize_pem())
}

/// The operator binary watching `ns` (its Lease there too), logging at `level` to `log`, against the
/// control plane of `kubeconfig`.
pub fn operator_binary_on(
    kubeconfig: &Path,
    ns: &str,
    identity: &str,
    log: &Path,
    level: &str,
    extra: &[&str],
) -> tokio::process::Child {
    operator_command(kubeconfig, ns, identity, log, level, extra).spawn().unwrap()
}

/// The operator binary's command line, for a test that changes its environment before it starts.
pub fn operator_command(
    kubeconfig: &Path,
    ns: &str,
    identity: &str,
    log: &Path,
    level: &str,
    extra: &[&str],
) -> tokio::process::Command {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-operator"));
    cmd.args(["run", "--metrics-addr", "127.0.0.1:0", "--namespace", ns, "--lease-namespace", ns])
        .args(["--identity", identity])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", level)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .kill_on_drop(true);
    cmd
}

/// The operator binary on the shared control plane.
pub fn operator_binary(ns: &str, identity: &str, log: &Path, level: &str) -> tokio::process::Child {
    operator_binary_on(kubeconfig(), ns, identity, log, level, &[])
}

/// A second control plane of its own (state under `_output/cp-faults`, etcd compacting every 10 s) for the
/// fault tests, which restart its daemons: the shared one must stay up for every other test.
pub fn fault_kubeconfig() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = fault_cp().arg("ensure").output().expect("running hack/control-plane.sh ensure");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "fault control plane: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let line = stdout.lines().find_map(|l| l.strip_prefix("export KUBECONFIG=")).expect("an export line");
        PathBuf::from(line.trim())
    })
}

fn fault_cp() -> std::process::Command {
    let mut cmd = std::process::Command::new(format!("{REPO}/hack/control-plane.sh"));
    cmd.env("MESH_CP_DIR", format!("{REPO}/_output/cp-faults")).env("MESH_CP_COMPACTION_INTERVAL", "10s");
    cmd
}

/// Runs `hack/control-plane.sh <action> <daemon>` on the fault control plane: `restart`, `down` or `up`
/// `apiserver` or `etcd`; `restart` and `up` return once the API server is ready again.
pub fn fault_daemon(action: &str, which: &str) {
    let out = fault_cp().args([action, which]).output().unwrap();
    assert!(out.status.success(), "{action} {which}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One request to the fault control plane's etcd through its JSON gateway (`/v3/kv/put`, ...); `key`
/// fields of `body` are given as text and sent base64-encoded, as the gateway wants them.
pub fn fault_etcd(call: &str, mut body: serde_json::Value) -> serde_json::Value {
    use base64::Engine;
    if let Some(key) = body.get("key").and_then(|k| k.as_str()) {
        body["key"] = base64::engine::general_purpose::STANDARD.encode(key).into();
    }
    let port = std::fs::read_to_string(format!("{REPO}/_output/cp-faults/etcd.port")).expect("the etcd port");
    let url = format!("http://127.0.0.1:{}/v3/{call}", port.trim());
    let out = std::process::Command::new("curl")
        .args(["-sSf", "--max-time", "10", "-X", "POST", "-d", &body.to_string(), &url])
        .output()
        .expect("running curl");
    assert!(out.status.success(), "etcd {call}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a JSON answer from etcd")
}

/// A client of the fault control plane.
pub async fn fault_client() -> Client {
    let kc = Kubeconfig::read_from(fault_kubeconfig()).expect("reading the fault kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(mesh_operator::controller::READ_TIMEOUT);
    Client::try_from(config).expect("a client")
}
