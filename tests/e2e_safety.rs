//! The safety rules (docs/design.md §3.4) under the ways they broke before: each test reproduces one finding on the
//! real control plane, under the history checker, and fails on the code that had it.
mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mesh_operator::api::MeshPolicy;
use mesh_operator::assignment::Assignment;
use mesh_operator::controller::leader;
use rendezvous::SimAgent;
use serde_json::json;
use support::*;

/// Agent Pods `{prefix}-{i}` labelled `app={app}` with presence, node ids and IPs of their own (`base`
/// keeps them apart from other groups in the namespace). Returns their node ids.
async fn agents(
    client: &Client,
    ns: &str,
    rv: &Rendezvous,
    prefix: &str,
    app: &str,
    n: usize,
    base: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(present_agent(client, ns, rv, &format!("{prefix}-{i}"), base + i, json!({"app": app})).await);
    }
    ids
}

async fn set_spec(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    Api::<MeshPolicy>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": spec})))
        .await
        .unwrap();
}

async fn carried_by(client: &Client, ns: &str, pod: &str) -> Option<Assignment> {
    let p = Api::<Pod>::namespaced(client.clone(), ns).get(pod).await.unwrap();
    Assignment::from_annotations(p.annotations())
}

/// Successful presence reads of the policy `mesh` in `ns`: new bodies and 304s (an unchanged list, as an
/// empty one is).
fn presence_reads(op: &Operator, ns: &str) -> u64 {
    let read = |result| {
        let label = mesh_operator::telemetry::PolicyLabel::new(ns, "mesh").with(result);
        op.metrics.presence_fetches.get_or_create(&label).get()
    };
    read("ok") + read("not_modified")
}

/// Headline bug 1: a rendezvous restarted empty, its agents re-registering one by one over 48 s (longer
/// than heartbeatTimeout), then half the fleet absent from presence for 30 s: not one annotation changes.
#[tokio::test]
async fn a_forgetful_rendezvous_changes_no_annotation() {
    let (client, ns, rv) = setup("forgetful").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 12, |_| None).await;
    let extra = json!({"heartbeatTimeout": "30s", "rendezvous": {"pollInterval": "2s"}});
    create_policy(&client, &ns, "mesh", spec(&rv, extra)).await;
    let before = wait_assigned(&client, &ns, 12).await;
    wait_condition(&client, &ns, "mesh", "Degraded", "False", "AsPlanned").await;
    let patches = op.pod_patches();

    let saved: BTreeMap<String, SimAgent> = std::mem::take(&mut rv.state.lock().unwrap().agents);
    let mut held = false;
    for (i, (id, agent)) in saved.iter().enumerate() {
        let reads = presence_reads(&op, &ns);
        wait_for("two presence reads", WAIT, || async { (presence_reads(&op, &ns) >= reads + 2).then_some(()) }).await;
        assert_eq!(assignments(&client, &ns).await, before, "annotations changed with {i} agents back");
        let p = policy(&client, &ns, "mesh").await;
        held |= condition(&p, "Degraded").is_some_and(|c| c.1 == "SuspectPresence");
        rv.state.lock().unwrap().agents.insert(id.clone(), agent.clone());
    }
    // Half the fleet absent from presence for longer than heartbeatTimeout allows without a hold.
    let half: Vec<(String, SimAgent)> = {
        let mut st = rv.state.lock().unwrap();
        ids[..6].iter().map(|id| (id.clone(), st.agents.remove(id).unwrap())).collect()
    };
    let gone = std::time::Instant::now();
    while gone.elapsed() < Duration::from_secs(30) {
        let reads = presence_reads(&op, &ns);
        wait_for("a presence read", WAIT, || async { (presence_reads(&op, &ns) > reads).then_some(()) }).await;
        assert_eq!(assignments(&client, &ns).await, before, "half the fleet missing for {:?}", gone.elapsed());
    }
    rv.state.lock().unwrap().agents.extend(half);
    wait_condition(&client, &ns, "mesh", "Degraded", "False", "AsPlanned").await;
    assert_eq!(assignments(&client, &ns).await, before);
    assert_eq!(op.pod_patches(), patches, "a forgetful rendezvous caused Pod writes");
    eprintln!("suspect presence held during the re-registration: {held}");
    op.kill().await;
    assert!(history.assert_clean() > 0);
}

/// Headline bug 2: a presence entry with an empty node id, matched to a Pod by hostname, used to panic
/// every replica. It is an exclusion with a reason, and the operator keeps working.
#[tokio::test]
async fn an_empty_node_id_is_an_exclusion_not_a_crash() {
    let (client, ns, rv) = setup("emptyid").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 5, |_| None).await;
    create_pod(&client, &ns, "nameless", json!({"app": "agent"}), json!({})).await;
    set_pod_status(&client, &ns, "nameless", "127.0.8.1", true).await;
    let entry = SimAgent {
        node_id: String::new(),
        address: "ws://0.0.0.0:3001/crdt-sync".into(),
        hostname: Some("nameless".into()),
        zone: None,
        alive: true,
        frozen_at_ms: None,
        unreachable: vec![],
    };
    rv.state.lock().unwrap().agents.insert(String::new(), entry);
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 5).await;
    // The status of the reconcile that wrote the plan lands after its writes: wait for it, not for them.
    wait_for("nameless to be excluded with its reason, beside 5 eligible agents", WAIT, || async {
        let status = policy(&client, &ns, "mesh").await.status?;
        let excluded = status.excluded.iter().any(|e| e.pod == "nameless" && e.reason.contains("empty node_id"));
        (excluded && status.eligible == 5).then_some(())
    })
    .await;
    // Still alive and reconciling: a new agent joins.
    let id = format!("{:064x}", 0xfeed);
    create_pod(&client, &ns, "late", json!({"app": "agent"}), json!({"agentmesh.dev/node-id": id})).await;
    set_pod_status(&client, &ns, "late", "127.0.8.2", true).await;
    rv.add(&id);
    wait_assigned(&client, &ns, 6).await;
    op.kill().await;
    assert!(history.assert_clean() > 0);
}

/// Finding 3: a policy frozen in Observe keeps its dialers dialing a Pod relabelled into another policy; and
/// Pods moving between two Enforce policies. The receiving policy waits until nothing of the other links
/// the Pod, so no agent is ever over the cap.
#[tokio::test]
async fn pods_moving_between_policies_never_exceed_the_cap() {
    let (client, ns, rv) = setup("moving").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    agents(&client, &ns, &rv, "a", "a", 6, 0).await;
    agents(&client, &ns, &rv, "b", "b", 6, 100).await;
    let selector = |app: &str| json!({"selector": {"matchLabels": {"app": app}}});
    create_policy(&client, &ns, "pa", spec(&rv, selector("a"))).await;
    create_policy(&client, &ns, "pb", spec(&rv, selector("b"))).await;
    wait_assigned(&client, &ns, 12).await;

    set_spec(&client, &ns, "pa", json!({"mode": "Observe"})).await;
    wait_condition(&client, &ns, "pa", "Ready", "True", "Observed").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.patch("a-0", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "b"}}})))
        .await
        .unwrap();
    wait_for("pb to leave a-0 alone while pa's frozen dialers still dial it", WAIT, || async {
        let p = policy(&client, &ns, "pb").await;
        p.status?.excluded.iter().any(|e| e.pod == "a-0" && e.reason.contains("\"pa\"")).then_some(())
    })
    .await;
    assert_eq!(carried_by(&client, &ns, "a-0").await.unwrap().policy, "pa");

    // pa enforces again: it releases a-0, and only then does pb take it.
    set_spec(&client, &ns, "pa", json!({"mode": "Enforce"})).await;
    wait_for("a-0 to carry pb's assignment", WAIT, || async {
        carried_by(&client, &ns, "a-0").await.filter(|a| a.policy == "pb" && a.links() > 0).map(|_| ())
    })
    .await;
    // Both Enforce: b-1 moves to pa.
    pods.patch("b-1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "a"}}})))
        .await
        .unwrap();
    wait_for("b-1 to carry pa's assignment", WAIT, || async {
        carried_by(&client, &ns, "b-1").await.filter(|a| a.policy == "pa" && a.links() > 0).map(|_| ())
    })
    .await;
    op.kill().await;
    assert!(history.assert_clean() > 0);
}

/// Finding 8: a Pod created already carrying `agentmesh.dev/*` keys (owned by whoever created it) loses
/// them once, and is not patched again on every poll.
#[tokio::test]
async fn keys_a_pod_was_created_with_are_removed_once() {
    let (client, ns, rv) = setup("stray").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 3, |_| None).await;
    let stray = json!({"agentmesh.dev/policy": "mesh", "agentmesh.dev/links": "1",
        "agentmesh.dev/peers": "[{\"nodeId\":\"ab\",\"url\":\"ws://127.0.0.9:1/\"}]"});
    create_pod(&client, &ns, "stray", json!({"app": "agent"}), stray).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 3).await;
    wait_for("the stray keys to be removed", WAIT, || async {
        let p = Api::<Pod>::namespaced(client.clone(), &ns).get("stray").await.ok()?;
        (!p.annotations().keys().any(|k| k.starts_with("agentmesh.dev/"))).then_some(())
    })
    .await;
    wait_condition(&client, &ns, "mesh", "Ready", "True", "Applied").await;
    let patches = op.pod_patches();
    let reads = presence_reads(&op, &ns);
    wait_for("three more presence reads", WAIT, || async { (presence_reads(&op, &ns) >= reads + 3).then_some(()) })
        .await;
    assert_eq!(op.pod_patches(), patches, "Pods re-patched at rest");
    op.kill().await;
    assert!(history.assert_clean() > 0);
}

/// Finding 6: one Pod that cannot be patched (here an admission policy refuses it) is reported by name,
/// with an Event, and the rest of the fleet is still assigned.
#[tokio::test]
async fn a_pod_that_cannot_be_patched_is_reported_and_the_rest_proceed() {
    let (client, ns, rv) = setup("unpatchable").await;
    let history = History::start(&client, &ns, 4).await;
    refuse_annotations_on(&client, &ns, "agent-3").await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 6, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    let p = wait_condition(&client, &ns, "mesh", "Ready", "False", "PatchFailed").await;
    let (_, _, message) = condition(&p, "Ready").unwrap();
    assert!(message.contains("agent-3") && message.contains("frozen by the test"), "{message}");
    assert_eq!(condition(&p, "Degraded").unwrap().1, "PatchFailed");
    let a = wait_assigned(&client, &ns, 5).await;
    assert_eq!(a["agent-3"], None);
    wait_for("a PatchFailed Event", WAIT, || async {
        let out = tool("kubectl", &["get", "events", "-n", &ns, "-o", "jsonpath={.items[*].reason}"]);
        String::from_utf8_lossy(&out.stdout).contains("PatchFailed").then_some(())
    })
    .await;
    assert_eq!(policy(&client, &ns, "mesh").await.status.unwrap().assigned, 5);
    op.kill().await;
    remove_admission(&client, &ns).await;
    assert!(history.assert_clean() > 0);
}

/// A ValidatingAdmissionPolicy (bound to `ns` only) refusing any `agentmesh.dev/peers` on Pod `pod`; returns
/// once the API server enforces it.
async fn refuse_annotations_on(client: &Client, ns: &str, pod: &str) {
    use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
    let vap: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": format!("freeze-{ns}")},
        "spec": {"failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["UPDATE"], "resources": ["pods"]}]},
            "validations": [{"expression": format!(
                "object.metadata.name != '{pod}' || !has(object.metadata.annotations) || !('agentmesh.dev/peers' in object.metadata.annotations)"),
                "message": "this Pod is frozen by the test"}]}}))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("freeze-{ns}")},
        "spec": {"policyName": format!("freeze-{ns}"), "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}}))
    .unwrap();
    Api::<ValidatingAdmissionPolicy>::all(client.clone()).create(&PostParams::default(), &vap).await.unwrap();
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    create_pod(client, ns, pod, json!({"app": "probe"}), json!({})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let probe = json!({"metadata": {"annotations": {"agentmesh.dev/peers": "[]"}}});
    let dry = PatchParams { dry_run: true, ..Default::default() };
    wait_for("the admission policy to be enforced", WAIT, || async {
        pods.patch(pod, &dry, &Patch::Merge(&probe)).await.is_err().then_some(())
    })
    .await;
    pods.delete(pod, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    wait_for("the probe Pod to be gone", WAIT, || async { pods.get_opt(pod).await.unwrap().is_none().then_some(()) })
        .await;
}

async fn remove_admission(client: &Client, ns: &str) {
    use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
    let name = format!("freeze-{ns}");
    let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone()).delete(&name, &DeleteParams::default()).await;
    let _ = Api::<ValidatingAdmissionPolicy>::all(client.clone()).delete(&name, &DeleteParams::default()).await;
}

/// Finding 5: a leader cut off from the API (its Lease requests fail; everything else works, so it still
/// sees every Pod event) stops writing before the standby leads, and sends no Pod write after.
#[tokio::test]
async fn a_leader_cut_off_from_its_lease_stops_writing_before_a_standby_leads() {
    let (client, ns, rv) = setup("cutoff").await;
    let history = History::start(&client, &ns, 4).await;
    let cut = Arc::new(AtomicBool::new(false));
    let a = Operator::start_as(lease_cutting_client(cut.clone()).await, &ns, "op-a", true).await;
    wait_for("op-a to lead", WAIT, || async { (a.metrics.leader.get() == 1).then_some(()) }).await;
    let b = Operator::start(&ns, "op-b", true).await;
    let ids = fleet(&client, &ns, &rv, 8, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 8).await;

    cut.store(true, Ordering::SeqCst);
    wait_for("op-a to stop leading", Duration::from_secs(30), || async { (a.metrics.leader.get() == 0).then_some(()) })
        .await;
    let a_patches = a.pod_patches();
    wait_for("op-b to lead", Duration::from_secs(30), || async { (b.metrics.leader.get() == 1).then_some(()) }).await;
    // Changes both replicas see: only op-b may act on them.
    Api::<Pod>::namespaced(client.clone(), &ns).delete("agent-2", &DeleteParams::default()).await.unwrap();
    wait_for("op-b to replan after agent-2 left", WAIT, || async {
        let a = assignments(&client, &ns).await;
        a.values().flatten().all(|x| x.peers.iter().all(|p| p.node_id != ids[2])).then_some(())
    })
    .await;
    wait_for("op-b's writes to be counted", WAIT, || async { (b.pod_patches() > 0).then_some(()) }).await;
    assert_eq!(a.pod_patches(), a_patches, "the cut-off leader wrote after it stopped leading");
    a.kill().await;
    b.kill().await;
    assert!(history.assert_clean() > 0);
}

/// Rule 5 with the clocks and the network against it. Replica A leads; replica B's clock runs
/// [`leader::SKEW_TOLERANCE`] ahead (libfaketime). A is cut off from its Lease while the fleet keeps
/// changing, so A writes until its fence ends: every write A made lands before the Lease names B (etcd's
/// revisions order both). Some of A's writes after the cut are held in the network; once B leads and the
/// chart's leader fence is installed they arrive, and the API server refuses each: it refuses A's writes
/// and takes B's.
#[tokio::test]
async fn a_skewed_standby_and_late_writes_never_overlap_the_leader() {
    let (client, ns, rv) = setup("skew").await;
    let history = History::start(&client, &ns, 4).await;
    grant_replicas(&client, &ns).await;
    let wire = Wire::default();
    let config = replica_config(&ns, "op-a").await;
    let a_client = kube::client::ClientBuilder::try_from(config).unwrap().with_layer(&wire).build();
    let a = Operator::start_as(a_client, &ns, "op-a", true).await;
    wait_for("op-a to lead", WAIT, || async { (a.metrics.leader.get() == 1).then_some(()) }).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = replica_kubeconfig(dir.path(), &ns, "op-b");
    let mut b = operator_command(&kubeconfig, &ns, "op-b", &dir.path().join("op-b.log"), "info", &[]);
    b.env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", format!("+{}s", leader::SKEW_TOLERANCE.as_secs()))
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let _b = b.spawn().unwrap();
    fleet(&client, &ns, &rv, 8, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 8).await;

    let takeover = tokio::spawn(takeover(client.clone(), ns.clone(), "op-b"));
    let churn = tokio::spawn(churn_readiness(client.clone(), ns.clone(), "agent-7"));
    let settled = wire.written().len();
    wait_for("op-a to write for the churn", WAIT, || async { (wire.written().len() > settled).then_some(()) }).await;
    wire.cut.store(true, Ordering::SeqCst);
    let at_cut = wire.written().len();
    let (took, ahead) = tokio::time::timeout(Duration::from_secs(90), takeover).await.expect("op-b to lead").unwrap();
    // `ahead` also loses the time op-b's write took to reach us.
    assert!(ahead > leader::SKEW_TOLERANCE.as_secs_f64() / 2.0, "op-b's clock is {ahead} s ahead: libfaketime?");
    wait_for("op-a to stop leading", WAIT, || async { (a.metrics.leader.get() == 0).then_some(()) }).await;
    churn.abort();
    let written = wire.written();
    assert!(written.len() > at_cut, "op-a wrote nothing after the cut: the check below would prove nothing");
    let last = written.into_iter().max().expect("op-a's writes");
    assert!(last < took, "op-a's write at revision {last} landed after op-b took the Lease at {took}");

    install_leader_fence(&client, &ns).await;
    let as_a = Client::try_from(replica_config(&ns, "op-a").await).unwrap();
    let as_b = Client::try_from(replica_config(&ns, "op-b").await).unwrap();
    wait_for("the API server to refuse op-a's writes", WAIT, || async {
        fenced(probe(&as_a, &ns).await).then_some(())
    })
    .await;
    assert_eq!(probe(&as_b, &ns).await.map_err(|s| s.message), Ok(()), "the leader's write was refused");
    let held = std::mem::take(&mut *wire.held.lock().unwrap());
    assert!(!held.is_empty(), "no write of op-a was held in the network");
    for late in held {
        let path = late.uri().path().to_string();
        let answer = as_a.send(late).await.unwrap();
        assert!(!answer.status().is_success(), "op-a's late write to {path} landed after op-b took over");
    }
    // op-b leads through the fence: the churned Pods ready again, every agent is planned.
    for pod in ["agent-6", "agent-7"] {
        let ip = Api::<Pod>::namespaced(client.clone(), &ns).get(pod).await.unwrap().status.unwrap().pod_ip.unwrap();
        set_pod_status(&client, &ns, pod, &ip, true).await;
    }
    wait_assigned(&client, &ns, 8).await;
    a.kill().await;
    assert!(history.assert_clean() > 0);
}

/// libfaketime's library, from Debian's `libfaketime` package (`.ci/run` installs it).
fn libfaketime() -> String {
    let found = std::fs::read_dir("/usr/lib").unwrap().filter_map(Result::ok).find_map(|d| {
        let lib = d.path().join("faketime/libfaketime.so.1");
        lib.exists().then(|| lib.display().to_string())
    });
    found.expect("libfaketime (apt-get install libfaketime)")
}

/// The first Lease event naming `holder`: its resourceVersion (etcd orders it against every Pod write),
/// and how far ahead of ours the holder's clock was when it wrote `renewTime`, in seconds.
async fn takeover(client: Client, ns: String, holder: &'static str) -> (u64, f64) {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::runtime::{WatchStreamExt, watcher};
    let leases = Api::<Lease>::namespaced(client, &ns);
    let mut events = watcher(leases, watcher::Config::default()).applied_objects().boxed();
    while let Some(lease) = events.next().await {
        let Ok(lease) = lease else { continue };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() == Some(holder) {
            let renewed = spec.renew_time.expect("a renewTime").0;
            let ahead = renewed.duration_since(k8s_openapi::jiff::Timestamp::now()).as_secs_f64();
            return (lease.resource_version().unwrap().parse().unwrap(), ahead);
        }
    }
    unreachable!("the Lease watch ended")
}

/// Flips the readiness of `pod` every 1.2 s: every flip changes the plan (a lone Pod, returning more than
/// the 1 s that ends a burst after it left, so admission never holds it back).
async fn churn_readiness(client: Client, ns: String, pod: &str) {
    let ip = Api::<Pod>::namespaced(client.clone(), &ns).get(pod).await.unwrap().status.unwrap().pod_ip.unwrap();
    for i in 0usize.. {
        set_pod_status(&client, &ns, pod, &ip, i % 2 == 1).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
}

/// A dry-run Pod write from `client`: the API server's answer.
async fn probe(client: &Client, ns: &str) -> Result<(), kube::core::Status> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let params = PatchParams { dry_run: true, ..Default::default() };
    let probe = json!({"metadata": {"annotations": {"agentmesh.dev/probe": "x"}}});
    match pods.patch("agent-0", &params, &Patch::Merge(&probe)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(*s),
        Err(e) => panic!("the probe write got no answer: {e}"),
    }
}

/// Whether the answer is the chart's leader fence refusing the write.
fn fenced(answer: Result<(), kube::core::Status>) -> bool {
    answer.is_err_and(|s| s.code == 403 && s.message.contains("does not hold the leader Lease"))
}

/// Replica A's network: it can cut A off from Leases, records the resourceVersion each of A's Pod writes
/// produced, and once `cut`, holds every other Pod write in the network (A sees its connection reset, so
/// it keeps writing) for the test to deliver late.
#[derive(Clone, Default)]
struct Wire {
    cut: Arc<AtomicBool>,
    /// Each of A's Pod writes: the resourceVersion it produced.
    written: Arc<Mutex<Vec<u64>>>,
    held: Arc<Mutex<Vec<http::Request<kube::client::Body>>>>,
    writes: Arc<AtomicUsize>,
}

impl Wire {
    fn written(&self) -> Vec<u64> {
        self.written.lock().unwrap().clone()
    }
}

struct Wired<S> {
    inner: S,
    wire: Wire,
}

impl<S> tower::Layer<S> for Wire {
    type Service = Wired<S>;

    fn layer(&self, inner: S) -> Wired<S> {
        Wired { inner, wire: self.clone() }
    }
}

type Answer<B> = http::Response<http_body_util::Either<Cuttable<B>, http_body_util::Full<bytes::Bytes>>>;

/// A response body that fails once its Lease request is cut off: a watch opened before the cut delivers
/// nothing after it, as for a replica partitioned from the API server.
struct Cuttable<B> {
    inner: B,
    cut: Option<Arc<AtomicBool>>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Cuttable<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        if self.cut.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
            return std::task::Poll::Ready(None);
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for Wired<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = Answer<B>;
    type Error = tower::BoxError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Answer<B>, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), tower::BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        use http_body_util::{BodyExt, Either, Full};
        let wire = self.wire.clone();
        let cut = wire.cut.load(Ordering::SeqCst);
        let lease = req.uri().path().contains("/leases");
        if cut && lease {
            return Box::pin(async { Err("cut off from the API server".into()) });
        }
        let pod_write = req.method() == http::Method::PATCH && req.uri().path().contains("/pods/");
        if pod_write && cut && wire.writes.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            wire.held.lock().unwrap().push(req);
            return Box::pin(async { Err("connection reset (the request is still in the network)".into()) });
        }
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answer = answer.await.map_err(Into::into)?;
            if !pod_write || !answer.status().is_success() {
                let cut = lease.then(|| wire.cut.clone());
                return Ok(answer.map(|inner| Either::Left(Cuttable { inner, cut })));
            }
            let (parts, body) = answer.into_parts();
            let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
            let version = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|pod| pod["metadata"]["resourceVersion"].as_str()?.parse::<u64>().ok());
            wire.written.lock().unwrap().extend(version);
            Ok(http::Response::from_parts(parts, Either::Right(Full::new(bytes))))
        })
    }
}

/// A client whose requests to Leases fail while `cut` is set: a replica partitioned from the API server
/// for exactly what keeps it leader.
async fn lease_cutting_client(cut: Arc<AtomicBool>) -> Client {
    let filter = tower::filter::FilterLayer::new(move |req: http::Request<kube::client::Body>| {
        if cut.load(Ordering::SeqCst) && req.uri().path().contains("/leases") {
            Err::<_, tower::BoxError>("cut off from the API server".into())
        } else {
            Ok(req)
        }
    });
    kube::client::ClientBuilder::try_from(config().await).unwrap().with_layer(&filter).build()
}

/// Finding 4: a replica that starts during a rendezvous outage (no presence of its own) adopts what the
/// Pods carry and still removes the Pods that are gone.
#[tokio::test]
async fn a_replica_starting_during_an_outage_adopts_and_removes_what_is_gone() {
    let (client, ns, mut rv) = setup("adopt").await;
    let history = History::start(&client, &ns, 4).await;
    let first = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 8, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    let before = wait_assigned(&client, &ns, 8).await;
    first.kill().await;
    rv.stop().await;
    Api::<Pod>::namespaced(client.clone(), &ns).delete("agent-5", &DeleteParams::default()).await.unwrap();
    let second = Operator::start(&ns, "op-b", false).await;
    let after = wait_for("agent-5 to be dropped from every list", WAIT, || async {
        let a = assignments(&client, &ns).await;
        a.values().flatten().all(|x| x.linked_ids().iter().all(|id| *id != ids[5])).then_some(a)
    })
    .await;
    for (pod, now) in &after {
        let (Some(now), Some(Some(was))) = (now, before.get(pod)) else { continue };
        assert!(now.peers.iter().all(|p| was.peers.contains(p)), "{pod} gained a peer without presence");
        assert!(now.accepts.iter().all(|a| was.accepts.contains(a)), "{pod} gained an accept without presence");
    }
    let p = wait_condition(&client, &ns, "mesh", "Ready", "False", "NoPresence").await;
    assert_eq!(condition(&p, "RendezvousReachable").unwrap().0, "False");
    second.kill().await;
    assert!(history.assert_clean() > 0);
}

/// Finding 7: a policy deleted while the operator was down: its Pods lose their annotations before it loses
/// its finalizer (a reconcile on an unsynced, empty Pod cache would drop the finalizer at once).
#[tokio::test]
async fn a_policy_deleted_while_the_operator_was_down_releases_its_pods() {
    let (client, ns, rv) = setup("downdelete").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 40, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 40).await;
    op.kill().await;
    Api::<MeshPolicy>::namespaced(client.clone(), &ns).delete("mesh", &DeleteParams::default()).await.unwrap();
    let op = Operator::start(&ns, "op-b", false).await;
    wait_for("MeshPolicy mesh to be gone", WAIT, || async {
        Api::<MeshPolicy>::namespaced(client.clone(), &ns).get_opt("mesh").await.unwrap().is_none().then_some(())
    })
    .await;
    let left: Vec<String> =
        assignments(&client, &ns).await.into_iter().filter(|(_, a)| a.is_some()).map(|(p, _)| p).collect();
    assert!(left.is_empty(), "the finalizer went while these Pods still carried the policy: {left:?}");
    op.kill().await;
    assert!(history.assert_clean() > 0);
}

/// Finding 9: a presence body at the default `--max-presence-bytes`, made of the smallest entries JSON
/// allows that still cost an allocation each (`{"node_id":"0"}`, about 524,000 of them), read by two
/// policies from two rendezvous (so nothing is shared), keeps the operator's peak memory under the chart's
/// 256 Mi limit. A third reads health reports at their worst: one entry listing 1.5 million empty ids,
/// then entries listing 64 one-byte ids each.
#[tokio::test]
async fn a_presence_body_at_the_size_limit_fits_the_memory_limit() {
    let (client, ns, rv) = setup("memory").await;
    let other_rv = Rendezvous::start().await;
    fleet(&client, &ns, &rv, 3, |_| None).await;
    let limit = mesh_operator::cli::DEFAULT_MAX_PRESENCE_BYTES;
    // One rendezvous lists one id over and over (the most entries a body can hold), the other distinct
    // ids (each indexed by the policy's view).
    let body = |distinct: bool| {
        let entry = |i: usize| format!(r#"{{"node_id":"{}"}},"#, if distinct { format!("{i:x}") } else { "0".into() });
        let mut body = b"[".to_vec();
        let mut i = 0;
        while body.len() + 2 * entry(i).len() <= limit {
            body.extend_from_slice(entry(i).as_bytes());
            i += 1;
        }
        body.extend_from_slice(br#"{"node_id":"end"}]"#);
        assert!(body.len() <= limit);
        (Arc::new(body), i + 1)
    };
    let ((same, entries), (distinct, distinct_entries)) = (body(false), body(true));
    rv.state.lock().unwrap().raw_body = Some(same);
    other_rv.state.lock().unwrap().raw_body = Some(distinct);
    let reports_rv = Rendezvous::start().await;
    let reports = {
        let mut body = br#"[{"node_id":"x","unreachable":["#.to_vec();
        body.extend(std::iter::repeat_n(br#""","#.as_slice(), 1_500_000).flatten());
        body.extend_from_slice(br#"""]}"#);
        let alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/";
        let ids = alphabet.chars().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(",");
        let mut i = 0;
        while body.len() + 200 + ids.len() <= limit {
            body.extend_from_slice(format!(r#",{{"node_id":"{i:x}","unreachable":[{ids}]}}"#).as_bytes());
            i += 1;
        }
        body.push(b']');
        assert!(body.len() <= limit);
        Arc::new(body)
    };
    reports_rv.state.lock().unwrap().raw_body = Some(reports);
    let log = std::env::temp_dir().join(format!("{ns}-operator.log"));
    let mut op = operator_binary(&ns, "op-mem", &log, "info");
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    let other = json!({"selector": {"matchLabels": {"app": "other"}}});
    create_policy(&client, &ns, "other", spec(&other_rv, other)).await;
    let third = json!({"selector": {"matchLabels": {"app": "third"}}});
    create_policy(&client, &ns, "reports", spec(&reports_rv, third)).await;
    wait_for("three reads of the big body at each rendezvous", WAIT, || async {
        let reads = |r: &Rendezvous| r.state.lock().unwrap().requests;
        (reads(&rv) >= 3 && reads(&other_rv) >= 3 && reads(&reports_rv) >= 3).then_some(())
    })
    .await;
    for policy in ["mesh", "other", "reports"] {
        wait_condition(&client, &ns, policy, "RendezvousReachable", "True", "PresenceRead").await;
    }
    let pid = op.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    eprintln!(
        "operator peak RSS, two policies each reading a {limit}-byte body ({entries} entries of one id; \
         {distinct_entries} distinct ids), a third one of health reports: {} MiB",
        peak_kib / 1024
    );
    op.kill().await.unwrap();
    assert!(peak_kib < 256 * 1024, "peak RSS {} MiB exceeds the chart's 256 Mi limit", peak_kib / 1024);
}
