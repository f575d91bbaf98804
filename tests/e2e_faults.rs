//! Faults of the control plane and of the operator itself, under the history checker, on a control plane
//! of their own (they restart its daemons). They run one at a time; each reports its time to converge.
//!
//! While kube-apiserver or etcd is down no event can be seen; the checker replays the relist that follows
//! (the state the Pods are in), so a violation that began and ended inside the gap would go unseen. Every
//! write the operator makes after the gap is still checked event by event.
mod support;

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use mesh_operator::api::MeshPolicy;
use mesh_operator::assignment::Assignment;
use serde_json::json;
use support::*;

/// One fault test at a time: they restart the daemons every test of this binary depends on.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn fault_setup(hint: &str) -> (Client, String, Rendezvous) {
    let client = fault_client().await;
    install_crd(&client).await;
    let ns = namespace(&client, hint).await;
    (client, ns, Rendezvous::start().await)
}

/// Waits until `n` agents carry assignments whose link counts lie in `links`, dialed and accepted
/// consistently from both ends; returns how long it took from `since`.
async fn converged(client: &Client, ns: &str, n: usize, links: RangeInclusive<usize>, since: Instant) -> Duration {
    wait_for(&format!("{n} agents with {links:?} consistent links each"), Duration::from_secs(180), || async {
        let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
            .list(&Default::default())
            .await
            .ok()?;
        let by_id: BTreeMap<String, Assignment> = pods
            .items
            .iter()
            .filter_map(|p| {
                let a = p.metadata.annotations.as_ref()?;
                Some((a.get("agentmesh.dev/node-id")?.clone(), Assignment::from_annotations(a)?))
            })
            .collect();
        let dials = |from: &str, to: &str| by_id.get(from).is_some_and(|a| a.peers.iter().any(|p| p.node_id == to));
        let consistent = by_id.iter().all(|(me, a)| {
            links.contains(&a.links())
                && a.peers
                    .iter()
                    .all(|p| by_id.get(p.node_id.as_str()).is_some_and(|o| o.accepts.iter().any(|a| a == me)))
                && a.accepts.iter().all(|from| dials(from, me))
        });
        (by_id.len() == n && consistent).then(|| since.elapsed())
    })
    .await
}

async fn set_max_peers(client: &Client, ns: &str, k: u32) {
    Api::<MeshPolicy>::namespaced(client.clone(), ns)
        .patch("mesh", &PatchParams::default(), &Patch::Merge(json!({"spec": {"maxPeers": k}})))
        .await
        .unwrap();
}

/// kube-apiserver (then etcd) restarted while a plan change is being written: the writes that failed are
/// retried, and no agent is ever over the cap.
#[tokio::test]
async fn a_control_plane_restart_during_a_write_wave() {
    let _one = SERIAL.lock().await;
    // 4 → 3 both drops and adds links (a shrink wave, then a grow wave); 4 → 6 only adds.
    for (daemon, k) in [("apiserver", 3), ("etcd", 6)] {
        let (client, ns, rv) = fault_setup(&format!("restart-{daemon}")).await;
        let history = History::start(&client, &ns, 6).await;
        let op = Operator::start_as(fault_client().await, &ns, "op-a", false).await;
        fleet(&client, &ns, &rv, 40, |_| None).await;
        create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
        converged(&client, &ns, 40, 4..=4, Instant::now()).await;

        let events = history.events();
        set_max_peers(&client, &ns, k).await;
        wait_for("the wave to begin", WAIT, || async { (history.events() > events + 1).then_some(()) }).await;
        let fault = Instant::now();
        tokio::task::spawn_blocking(move || fault_daemon("restart", daemon)).await.unwrap();
        let took = converged(&client, &ns, 40, k as usize..=k as usize, fault).await;
        eprintln!("{daemon} restarted mid-wave: converged {took:?} after the restart began");
        op.kill().await;
        assert!(history.assert_clean() > 0);
    }
}

/// The operator killed with SIGKILL mid-wave and restarted during a rendezvous outage: it adopts what the
/// Pods carry (writes nothing new), and completes the change once the rendezvous is back.
#[tokio::test]
async fn the_operator_killed_mid_wave_and_restarted_during_an_outage() {
    let _one = SERIAL.lock().await;
    let (client, ns, mut rv) = fault_setup("sigkill").await;
    let history = History::start(&client, &ns, 6).await;
    let log = std::env::temp_dir().join(format!("{ns}-operator.log"));
    let mut op = operator_binary_on(fault_kubeconfig(), &ns, "op-a", &log, "info", &["--leader-elect=false"]);
    fleet(&client, &ns, &rv, 40, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    converged(&client, &ns, 40, 4..=4, Instant::now()).await;

    let events = history.events();
    set_max_peers(&client, &ns, 3).await;
    wait_for("the wave to begin", WAIT, || async { (history.events() > events + 1).then_some(()) }).await;
    op.kill().await.unwrap(); // SIGKILL
    rv.stop().await;
    let log2 = std::env::temp_dir().join(format!("{ns}-operator-2.log"));
    let mut op = operator_binary_on(fault_kubeconfig(), &ns, "op-b", &log2, "info", &["--leader-elect=false"]);
    wait_for("the restarted operator to report no presence", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        condition(&p, "Ready").filter(|c| c.1 == "NoPresence").map(|_| ())
    })
    .await;
    let resumed = Instant::now();
    rv.resume().await;
    let took = converged(&client, &ns, 40, 3..=3, resumed).await;
    eprintln!("killed mid-wave, restarted during an outage: converged {took:?} after the rendezvous came back");
    op.kill().await.unwrap();
    assert!(history.assert_clean() > 0);
}

/// A watch that expires: while kube-apiserver is down an agent Pod vanishes from etcd and etcd is compacted
/// past every revision the operator has seen, so its watches resume with a 410 Gone. The Pod's deletion was
/// never sent as a watch event; the operator learns of it only from the relist that follows, and replans
/// its peers without any agent going over the cap.
#[tokio::test]
async fn a_watch_expired_by_compaction_is_relisted() {
    let _one = SERIAL.lock().await;
    let (client, ns, rv) = fault_setup("watch-expired").await;
    let history = History::start(&client, &ns, 4).await;
    let ids = fleet(&client, &ns, &rv, 40, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    // Started after the policy exists, so its Pod watch lists once, for that policy: a relist for a policy
    // created later could land inside the outage below and list afresh instead of resuming.
    let op = Operator::start_as(fault_client().await, &ns, "op-a", false).await;
    converged(&client, &ns, 40, 4..=4, Instant::now()).await;

    let key = format!("/registry/pods/{ns}/agent-7");
    tokio::task::spawn_blocking(move || {
        fault_daemon("down", "apiserver");
        let gone = fault_etcd("kv/deleterange", json!({ "key": key }));
        assert_eq!(gone["deleted"], "1", "agent-7 removed from etcd: {gone}");
        let put = fault_etcd("kv/put", json!({"key": "/mesh-test/bump", "value": ""}));
        let revision = put["header"]["revision"].as_str().expect("etcd's revision").to_string();
        fault_etcd("kv/compaction", json!({"revision": revision, "physical": true}));
        fault_daemon("up", "apiserver");
    })
    .await
    .unwrap();
    let back = Instant::now();
    wait_for("the operator's Pod watch to expire (410)", WAIT, || async {
        (op.watch_errors("pods", "expired") > 0).then_some(())
    })
    .await;
    let took = converged(&client, &ns, 39, 3..=4, back).await;
    eprintln!("watch expired: replanned without agent-7 {took:?} after the API server came back");
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns).list(&Default::default()).await;
    let mentions = serde_json::to_string(&pods.unwrap().items).unwrap().matches(&ids[7]).count();
    assert_eq!(mentions, 0, "no Pod dials or accepts the vanished agent");
    op.kill().await;
    assert!(history.assert_clean() > 0);
}
